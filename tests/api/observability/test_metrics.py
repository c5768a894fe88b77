"""`GET /metrics` (api/observability/metrics.py), scraped from a real server after real
requests and read with prometheus_client's own parser: runs by state as the database has them,
callbacks counted and timed, dispatch latency and errors by kind, webhook outcomes, and the
reconciler's lag. Counters are per process and other tests move them too, so each check compares
a scrape after with a scrape before."""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from api.config import Settings
from api.dispatch.base import DispatchError
from api.runs.states import RunStatus
from tests.api.dispatch.test_worker import NO_WAIT, FakePlatform, make_worker
from tests.api.factories import insert_runs, token_for
from tests.conftest import LiveServer
from trainer.contract import events as ev

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: LiveServer) -> Samples:
    r = httpx.get(f"{server.url}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_runs_by_state_come_from_the_database(live_server: LiveServer, engine: Engine) -> None:
    insert_runs(engine, 3, status=RunStatus.queued)
    insert_runs(engine, 2, status=RunStatus.running)
    r = httpx.post(
        f"{live_server.url}/api/v1/runs",
        json={"spec": {"model_id": "google/gemma-3-4b-it", "dataset": "digits"}},
    )
    assert r.status_code == 201, r.text
    got = scrape(live_server)
    assert value(got, "tuneplane_runs", state="queued") == 4
    assert value(got, "tuneplane_runs", state="running") == 2
    assert value(got, "tuneplane_runs", state="succeeded") == 0
    assert value(got, "tuneplane_database_up") == 1
    # Requests are counted by route template: no label per run id.
    assert value(got, "tuneplane_http_requests_total", route="/api/v1/runs", method="POST",
                 status="201") >= 1  # fmt: skip
    assert not [k for k in got if any(re.search(r"run_[0-9a-f]{20}", v) for _, v in k[1])]


def test_callbacks_are_counted_and_timed(
    live_server: LiveServer, engine: Engine, settings: Settings
) -> None:
    (run_id,) = insert_runs(engine)
    before = scrape(live_server)
    url = f"{live_server.url}/api/v1/runs/{run_id}/events"
    own = {"Authorization": f"Bearer {token_for(settings, run_id)}"}
    for seq in range(3):
        event = ev.StartedEvent(run_id=run_id, seq=seq, id=f"metrics-{run_id}-{seq}")
        body = event.model_dump_json()
        assert httpx.post(url, content=body, headers=own).status_code == 201
    assert httpx.post(url, json={}, headers={}).status_code == 401
    after = scrape(live_server)
    assert (
        value(after, "tuneplane_callbacks_total", status="201")
        - value(before, "tuneplane_callbacks_total", status="201")
        == 3
    )
    assert (
        value(after, "tuneplane_callbacks_total", status="401")
        - value(before, "tuneplane_callbacks_total", status="401")
        == 1
    )
    count = value(after, "tuneplane_callback_seconds_count") - value(
        before, "tuneplane_callback_seconds_count"
    )
    assert count == 4
    assert value(after, "tuneplane_callback_seconds_sum") > value(
        before, "tuneplane_callback_seconds_sum"
    )


def test_dispatch_latency_errors_and_reconciler_lag(
    live_server: LiveServer, engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(max_concurrency=5)
    insert_runs(engine, 3, status=RunStatus.queued)
    platform = FakePlatform()
    platform.errors = [DispatchError("permanent", "PERMISSION_DENIED"),
                       DispatchError("quota", "no GPUs")]  # fmt: skip
    before = scrape(live_server)
    worker = make_worker(settings, engine, platform, retry=NO_WAIT)
    worker.dispatch_ready()
    worker.reconcile()
    worker.tick()  # a full pass: reconciles (its lag restarts)
    after = scrape(live_server)
    for kind in ("permanent", "quota"):
        assert (
            value(after, "tuneplane_dispatch_errors_total", kind=kind)
            - value(before, "tuneplane_dispatch_errors_total", kind=kind)
            == 1
        )
    started = value(after, "tuneplane_dispatch_seconds_count", dispatcher="local") - value(
        before, "tuneplane_dispatch_seconds_count", dispatcher="local"
    )
    assert started == len(platform.launches) >= 1
    assert value(after, "tuneplane_reconcile_last_success_timestamp_seconds") > 0
    assert 0 <= value(after, "tuneplane_reconcile_lag_seconds") < 600
