"""GET /runs/{id}, cancel, retrain and the events list."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.db import session_scope, utcnow
from api.events.models import RunEvent
from api.runs.finish import finish_run
from api.runs.models import Run
from api.runs.states import TERMINAL, RunStatus
from api.runs.status import set_status

SPEC = {"model_id": "google/gemma-3-4b-it", "dataset": "digits"}
S = RunStatus


def create(client: TestClient, **body: Any) -> dict[str, Any]:
    r = client.post("/api/v1/runs", json={"spec": SPEC, **body})
    assert r.status_code == 201, r.text
    run: dict[str, Any] = r.json()
    return run


def move(engine: Engine, run_id: str, *path: RunStatus) -> None:
    """Walk a run through the state machine, as the worker and the callbacks would."""
    with session_scope(engine) as s:
        run = s.get(Run, run_id)
        assert run is not None
        for status in path:
            move_to = finish_run if status in TERMINAL else set_status
            move_to(s, run, status)
        s.commit()


def test_get_unknown_or_malformed_run(client: TestClient) -> None:
    r = client.get("/api/v1/runs/run_doesnotexist")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["title"] == "Run not found" and "run_doesnotexist" in r.json()["detail"]
    r = client.get("/api/v1/runs/" + "x" * 41)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "path.run_id"
    assert client.post("/api/v1/runs/nope/cancel").status_code == 404
    assert client.post("/api/v1/runs/nope/retrain", json={}).status_code == 404
    assert client.get("/api/v1/runs/nope/events").status_code == 404


def test_cancel_a_queued_run_at_once(client: TestClient) -> None:
    run = create(client)
    r = client.post(f"/api/v1/runs/{run['id']}/cancel")
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled" and r.json()["finished_at"] is not None
    assert r.json()["status_reason"] == "cancelled by request"


@pytest.mark.parametrize(
    "path", [(S.dispatched,), (S.dispatched, S.running)], ids=["dispatched", "running"]
)
def test_cancel_an_active_run_leaves_it_to_the_worker(
    client: TestClient, engine: Engine, path: tuple[RunStatus, ...]
) -> None:
    run = create(client)
    move(engine, run["id"], *path)
    r = client.post(f"/api/v1/runs/{run['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelling"
    assert r.json()["finished_at"] is None
    # Asking again while the cancel is in flight changes nothing.
    again = client.post(f"/api/v1/runs/{run['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelling"


@pytest.mark.parametrize(
    "path",
    [
        (S.cancelled,),
        (S.failed,),
        (S.dispatched, S.running, S.succeeded),
        (S.dispatched, S.cancelling, S.cancelled),
    ],
    ids=["cancelled", "failed", "succeeded", "cancelled-after-cancelling"],
)
def test_cancel_a_finished_run_is_a_409_saying_why(
    client: TestClient, engine: Engine, path: tuple[RunStatus, ...]
) -> None:
    run = create(client)
    move(engine, run["id"], *path)
    r = client.post(f"/api/v1/runs/{run['id']}/cancel")
    assert r.status_code == 409
    assert r.headers["content-type"] == "application/problem+json"
    assert f"is {path[-1].value}" in r.json()["detail"]
    assert client.get(f"/api/v1/runs/{run['id']}").json()["status"] == path[-1].value


def test_retrain_copies_the_spec_with_overrides(client: TestClient, engine: Engine) -> None:
    parent = create(client, name="base", tags=["pets"], notes="first")
    move(engine, parent["id"], S.dispatched, S.running, S.succeeded)
    r = client.post(
        f"/api/v1/runs/{parent['id']}/retrain",
        json={"overrides": {"train_size": 2500, "learning_rate": 1e-4}},
    )
    assert r.status_code == 201, r.text
    child = r.json()
    assert r.headers["location"] == f"/api/v1/runs/{child['id']}"
    assert child["parent_id"] == parent["id"] and child["status"] == "queued"
    assert child["spec"] == {**parent["spec"], "train_size": 2500, "learning_rate": 1e-4}
    assert (child["name"], child["tags"], child["notes"]) == ("base", ["pets"], "first")
    assert child["estimate"]["time"]["train_seconds"] > parent["estimate"]["time"]["train_seconds"]
    # Without a body: the same spec; name, tags, notes given replace the parent's.
    plain = client.post(f"/api/v1/runs/{parent['id']}/retrain")
    assert plain.status_code == 201 and plain.json()["spec"] == parent["spec"]
    named = client.post(
        f"/api/v1/runs/{parent['id']}/retrain", json={"name": "v2", "tags": [], "notes": ""}
    ).json()
    assert (named["name"], named["tags"], named["notes"]) == ("v2", [], "")


def test_retrain_validates_overrides_like_a_new_spec(client: TestClient) -> None:
    parent = create(client)
    r = client.post(
        f"/api/v1/runs/{parent['id']}/retrain",
        json={"overrides": {"lora_alpha": 0, "colour": "red"}},
    )
    assert r.status_code == 422
    errors = {e["field"]: e["message"] for e in r.json()["errors"]}
    assert errors["body.overrides.lora_alpha"] == "must be between 1 and 4096 (got 0)"
    assert errors["body.overrides.colour"].startswith("unknown field")
    r = client.post(
        f"/api/v1/runs/{parent['id']}/retrain",
        json={"overrides": {"model_id": "google/gemma-3-27b-it"}},
    )
    assert r.status_code == 422 and r.json()["title"] == "Run does not fit the GPU"
    r = client.post(f"/api/v1/runs/{parent['id']}/retrain", json={"override": {}})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body.override"


def _event(
    run_id: str, seq: int, suffix: str = "", received_offset: float = 0, attempt: int = 0
) -> RunEvent:
    now = utcnow()
    return RunEvent(
        id=f"ev-{seq}{suffix}",
        run_id=run_id,
        seq=seq,
        attempt=attempt,
        type="progress",
        time=now,
        received_at=now + timedelta(seconds=received_offset),
        data={"step": seq},
    )


def test_events_in_order_and_paged_without_splitting_a_seq(
    client: TestClient, engine: Engine
) -> None:
    run = create(client)
    other = create(client)
    with session_scope(engine) as s:
        # Stored out of order; seq 2 twice (a platform retry of the task, its attempt 1,
        # numbers its events again).
        for ev in [
            _event(run["id"], 3),
            _event(run["id"], 0),
            _event(run["id"], 2, "b", received_offset=1, attempt=1),
            _event(run["id"], 1),
            _event(run["id"], 2, "a"),
            _event(other["id"], 0, "other"),
        ]:
            s.add(ev)
        s.commit()
    url = f"/api/v1/runs/{run['id']}/events"
    everything = client.get(url).json()
    assert [e["id"] for e in everything] == ["ev-0", "ev-1", "ev-2a", "ev-2b", "ev-3"]
    assert everything[0]["data"] == {"step": 0} and everything[0]["run_id"] == run["id"]

    # limit 3 would cut between the two seq-2 events: the page stops before them instead.
    first = client.get(f"{url}?limit=3").json()
    assert [e["id"] for e in first] == ["ev-0", "ev-1"]
    second = client.get(f"{url}?limit=3&after_seq={first[-1]['seq']}").json()
    assert [e["id"] for e in second] == ["ev-2a", "ev-2b", "ev-3"]
    # A page too small for one seq's events still returns all of them (no endless loop).
    assert [e["id"] for e in client.get(f"{url}?limit=1&after_seq=1").json()] == [
        "ev-2a",
        "ev-2b",
    ]
    assert client.get(f"{url}?after_seq=3").json() == []
    assert client.get(f"{url}?limit=0").status_code == 422
    assert client.get(f"{url}?after_seq=-2").status_code == 422
