"""`POST /runs/{id}/events:batch`: a trainer's backlog in one request, applied in order, each
event idempotent by its id, with a receipt per event; and the trainer's reporter against it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import col, select

from api.config import Settings
from api.db import session_scope
from api.events.models import ProgressPoint, RunEvent
from api.runs.states import RunStatus
from tests.api.events.test_callbacks import count, load, post
from tests.api.factories import full_history, insert_runs, token_for
from tests.conftest import LiveServer
from trainer.contract import events as ev
from trainer.report import EventLog
from trainer.report_http import HttpReporter


def post_batch(
    client: TestClient | httpx.Client, run_id: str, body: Any, token: str | None
) -> httpx.Response:
    if not isinstance(body, (str, bytes)):
        body = json.dumps({"events": [json.loads(e.model_dump_json()) for e in body]})
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return client.post(f"/api/v1/runs/{run_id}/events:batch", content=body, headers=headers)


def _progress(run_id: str, steps: range) -> list[ev.Event]:
    return [
        ev.ProgressEvent(
            run_id=run_id, seq=s, data=ev.Progress(step=s, total_steps=1000, epoch=0.1, loss=1.0)
        )
        for s in steps
    ]


def test_a_whole_execution_in_one_batch_matches_single_posts(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    one_by_one, batched = insert_runs(engine, 2)
    for event in full_history(one_by_one, steps=6):
        post(client, one_by_one, event, token_for(settings, one_by_one))
    history = full_history(batched, steps=6)
    r = post_batch(client, batched, history, token_for(settings, batched))
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["stored"], body["duplicates"], body["refused"]) == (len(history), 0, 0)
    assert [x["id"] for x in body["receipts"]] == [e.id for e in history]
    assert [x["index"] for x in body["receipts"]] == list(range(len(history)))
    assert body["run_status"] == "succeeded"
    a, b = load(engine, one_by_one), load(engine, batched)
    for field in ("status", "baseline_accuracy", "final_accuracy", "last_step", "total_steps"):
        assert getattr(a, field) == getattr(b, field), field
    assert b.checkpoint_uri == f"/ck/{batched}/step-6" and b.artifact_uri == f"/out/{batched}"
    assert count(engine, ProgressPoint, batched) == 6

    # Sent again (a retry after a lost answer): every event is a repeat, nothing changes.
    again = post_batch(client, batched, history, token_for(settings, batched)).json()
    assert (again["stored"], again["duplicates"]) == (0, len(history))
    assert {x["status"] for x in again["receipts"]} == {200}
    assert count(engine, RunEvent, batched) == len(history)


def test_each_event_gets_its_own_receipt(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    (run_id,) = insert_runs(engine, status=RunStatus.running)
    token = token_for(settings, run_id)
    stored_before = _progress(run_id, range(0, 1))
    post(client, run_id, stored_before[0], token)
    good = _progress(run_id, range(1, 4))
    impostor = _progress(run_id, range(2, 3))[0]  # a new id at seq 2, taken in this batch
    items = [json.loads(e.model_dump_json()) for e in [stored_before[0], *good, impostor]]
    items.insert(2, {**items[1], "id": "nan-loss", "seq": 9})
    items[2]["data"] = {**items[2]["data"], "loss": "__NAN__"}
    body = json.dumps({"events": items}).replace('"__NAN__"', "NaN")
    r = post_batch(client, run_id, body, token)
    assert r.status_code == 200, r.text
    receipts = r.json()["receipts"]
    assert [(x["id"], x["status"]) for x in receipts] == [
        (stored_before[0].id, 200),
        (good[0].id, 201),
        ("nan-loss", 422),
        (good[1].id, 201),
        (good[2].id, 201),
        (impostor.id, 409),
    ]
    assert receipts[2]["errors"] == [
        {"field": "data.loss", "message": "Input should be a finite number"}
    ]
    assert "seq 2" in receipts[5]["outcome"]
    assert r.json()["refused"] == 2
    with session_scope(engine) as s:
        seqs = s.exec(select(RunEvent.seq).where(RunEvent.run_id == run_id)).all()
    assert sorted(seqs) == [0, 1, 2, 3]


def test_events_after_the_final_one_in_a_batch_are_not_applied(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    (run_id,) = insert_runs(engine, status=RunStatus.running)
    done = ev.CompletedEvent(run_id=run_id, seq=2, data=ev.Completed(step=1))
    batch = [*_progress(run_id, range(1, 2)), done, *_progress(run_id, range(3, 5))]
    receipts = post_batch(client, run_id, batch, token_for(settings, run_id)).json()["receipts"]
    assert [x["state"] for x in receipts] == ["applied", "applied", "rejected", "rejected"]
    assert load(engine, run_id).last_step == 1
    assert count(engine, ProgressPoint, run_id) == 1


def test_limits_and_the_order_of_checks(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    (run_id, other) = insert_runs(engine, 2, status=RunStatus.running)
    token = token_for(settings, run_id)
    # The credential first: no token, or another run's, learns nothing about the body.
    assert post_batch(client, run_id, "{not json", None).status_code == 401
    assert post_batch(client, run_id, "{not json", token_for(settings, other)).status_code == 403
    assert post_batch(client, run_id, "x" * (ev.MAX_EVENT_BYTES + 1), token).status_code == 413
    r = post_batch(client, run_id, _progress(run_id, range(ev.MAX_BATCH_EVENTS + 1)), token)
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "events"
    assert f"at most {ev.MAX_BATCH_EVENTS}" in r.json()["detail"]
    for bad in ("{not json", "[]", '{"events": {}}', '{"events": [], "more": 1}'):
        r = post_batch(client, run_id, bad, token)
        assert r.status_code == 422, bad
        assert r.headers["content-type"] == "application/problem+json"
    assert (
        post_batch(client, run_id, _progress(run_id, range(ev.MAX_BATCH_EVENTS)), token).json()[
            "stored"
        ]
        == ev.MAX_BATCH_EVENTS
    )
    missing = token_for(settings, "run_missing")
    assert (
        post_batch(client, "run_missing", _progress("run_missing", range(2)), missing).status_code
        == 404
    )


def test_a_lone_surrogate_is_a_422_not_a_500(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    # JSON may spell "\ud800" (half of a UTF-16 pair), which no UTF-8 row or answer can hold:
    # the batch once took it through `json.loads` and failed writing its receipts.
    (run_id,) = insert_runs(engine, status=RunStatus.running)
    token = token_for(settings, run_id)
    items = [json.loads(e.model_dump_json()) for e in _progress(run_id, range(2))]
    items[0]["id"] = "half-__S__"
    items[1]["data"]["loss"] = "not a number"  # an invalid event: the event-by-event pass
    body = json.dumps({"events": items}).replace("__S__", "\\ud800")
    r = post_batch(client, run_id, body, token)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "(body)"
    single = json.dumps(items[0]).replace("__S__", "\\ud800")
    r = client.post(
        f"/api/v1/runs/{run_id}/events",
        content=single,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert count(engine, RunEvent, run_id) == 0


# -- the trainer's reporter against the real api -----------------------------------------------


def test_the_reporter_batches_its_backlog_and_drops_a_409_without_retrying(
    live_server: LiveServer, engine: Engine, settings: Settings, tmp_path: Path
) -> None:
    (run_id,) = insert_runs(engine)
    token = token_for(settings, run_id)
    url = f"{live_server.url}/api/v1/runs/{run_id}/events"
    # Another event already holds seq 0 (the place the reporter's first event will claim).
    holder = ev.PhaseEvent(run_id=run_id, seq=0, data=ev.PhaseChange(phase="loading"))
    with httpx.Client(base_url=live_server.url) as c:
        assert post(c, run_id, holder, token).status_code == 201

    reporter = HttpReporter(url, token, tmp_path / "spool.jsonl")
    log = EventLog(reporter, run_id)
    emitted = [log.emit("started")]  # seq 0: a 409, dropped
    emitted += [
        log.emit("progress", ev.Progress(step=s, total_steps=500, epoch=s / 500))
        for s in range(1, 501)
    ]
    reporter.close(timeout=120)

    assert reporter.dropped == 1 and reporter.delivered == 500 and reporter.spooled == 0
    assert reporter.batches >= 1  # 500 events emitted at once do not go one by one
    assert not (tmp_path / "spool.jsonl").exists()
    with session_scope(engine) as s:
        rows = s.exec(
            select(RunEvent.id, RunEvent.seq)
            .where(RunEvent.run_id == run_id)
            .order_by(col(RunEvent.seq))
        ).all()
    assert rows[0] == (holder.id, 0)
    assert [r[0] for r in rows[1:]] == [e.id for e in emitted[1:]]
    assert load(engine, run_id).last_step == 500
