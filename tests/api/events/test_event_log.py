"""The event log as a contract: no non-finite number gets in, a finished run's data never changes,
and one event per place (run, segment, attempt, seq) — in the api and in the database."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from api.config import Settings
from api.db import session_scope
from api.events.models import ClassMetric, Evaluation, ProgressPoint, RunEvent
from api.runs.states import RunStatus
from tests.api.events.test_callbacks import count, load, post
from tests.api.factories import evaluation, full_history, insert_runs, token_for
from trainer.contract import events as ev

# -- non-finite numbers ------------------------------------------------------------------------

NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]  # 1e999 parses to infinity


def _progress_json(run_id: str, seq: int = 1) -> dict[str, Any]:
    return ev.ProgressEvent(
        run_id=run_id,
        seq=seq,
        data=ev.Progress(step=3, total_steps=9, epoch=0.3, loss=1.0, learning_rate=1e-4),
    ).model_dump(mode="json")


def _evaluation_json(run_id: str, seq: int = 1) -> dict[str, Any]:
    return ev.EvaluationEvent(run_id=run_id, seq=seq, data=evaluation("final", 0.5)).model_dump(
        mode="json"
    )


PLACES = [
    (_progress_json, ("data", "loss")),
    (_progress_json, ("data", "learning_rate")),
    (_progress_json, ("data", "samples_per_second")),
    (_progress_json, ("data", "epoch")),
    (_evaluation_json, ("data", "accuracy")),
    (_evaluation_json, ("data", "seconds")),
    (_evaluation_json, ("data", "per_class", 1, "precision")),
]


def _with_literal(body: dict[str, Any], path: tuple[str | int, ...], literal: str) -> str:
    """`body` as JSON text with the number at `path` written as `literal` (NaN, 1e999, ...),
    which no JSON encoder writes but a client can send."""
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = "__HERE__"
    return json.dumps(body).replace('"__HERE__"', literal)


@pytest.mark.parametrize("literal", NON_FINITE)
@pytest.mark.parametrize(("make", "path"), PLACES)
def test_a_non_finite_number_anywhere_is_a_422_naming_the_field(
    client: TestClient,
    engine: Engine,
    settings: Settings,
    make: Any,
    path: tuple[str | int, ...],
    literal: str,
) -> None:
    (run_id,) = insert_runs(engine, status=RunStatus.running)
    r = post(
        client, run_id, _with_literal(make(run_id), path, literal), token_for(settings, run_id)
    )
    assert r.status_code == 422, r.text
    field = ".".join(map(str, path))
    assert [e["field"] for e in r.json()["errors"]] == [field], r.json()
    assert "finite" in r.json()["errors"][0]["message"]
    assert count(engine, RunEvent, run_id) == 0
    assert count(engine, ProgressPoint, run_id) == 0
    assert load(engine, run_id).final_accuracy is None


def test_the_trainer_reports_a_diverged_loss_as_null() -> None:
    # The contract refuses NaN on the trainer's side too, so trainer/train.py sends None.
    with pytest.raises(ValueError, match="finite"):
        ev.Progress(step=1, total_steps=2, epoch=0.5, loss=float("nan"))
    assert ev.Progress(step=1, total_steps=2, epoch=0.5, loss=None).loss is None


# -- a finished run's data never changes ------------------------------------------------------


def _champion(client: TestClient, engine: Engine, settings: Settings) -> tuple[str, str]:
    """A run that completed with final accuracy 0.3."""
    (run_id,) = insert_runs(engine)
    token = token_for(settings, run_id)
    history = full_history(run_id, steps=4)
    history[-3] = ev.EvaluationEvent(
        id=history[-3].id, run_id=run_id, seq=history[-3].seq, data=evaluation("final", 0.3)
    )
    for event in history:
        assert post(client, run_id, event, token).status_code == 201
    assert load(engine, run_id).status == RunStatus.succeeded
    return run_id, token


def _snapshot(client: TestClient, engine: Engine, run_id: str) -> dict[str, Any]:
    run = load(engine, run_id).model_dump(mode="json", exclude={"updated_at"})
    metrics = client.get(f"/api/v1/runs/{run_id}/metrics?predictions=true").json()
    with session_scope(engine) as s:
        classes = [c.model_dump() for c in s.exec(select(ClassMetric)).all()]
    return {"run": run, "metrics": metrics, "classes": classes}


def test_after_completed_nothing_rewrites_the_run(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    """The forgery of issue 17: after `completed`, an evaluation made the final metrics 1.0 and
    an artifact event moved the artifact URI. Now every late event is kept and rejected."""
    run_id, token = _champion(client, engine, settings)
    before = _snapshot(client, engine, run_id)
    perfect = evaluation("final", 1.0, labels=("zero", "one", "forged"))
    late: list[ev.Event] = [
        ev.EvaluationEvent(run_id=run_id, seq=100, data=perfect),
        ev.EvaluationEvent(run_id=run_id, seq=101, data=evaluation("baseline", 0.05)),
        ev.ArtifactEvent(run_id=run_id, seq=102, data=ev.Artifact(kind="output_dir", uri="/x")),
        ev.ArtifactEvent(run_id=run_id, seq=103, data=ev.Artifact(kind="adapter", uri="/y")),
        ev.CheckpointEvent(run_id=run_id, seq=104, data=ev.Checkpoint(step=99, uri="/ck/99")),
        ev.ProgressEvent(
            run_id=run_id, seq=105, data=ev.Progress(step=99, total_steps=99, epoch=9.0)
        ),
        ev.ProgressEvent(  # a step the run has: its loss must not change either
            run_id=run_id, seq=106, data=ev.Progress(step=2, total_steps=4, epoch=0.5, loss=0.0)
        ),
        ev.StartedEvent(run_id=run_id, seq=107),
        ev.FailedEvent(run_id=run_id, seq=108, data=ev.Failed(error="forged")),
        ev.SegmentDoneEvent(
            run_id=run_id, seq=109, data=ev.SegmentDone(step=99, checkpoint_uri="/ck/99")
        ),
    ]
    for event in late:
        r = post(client, run_id, event, token)
        assert r.status_code == 201, r.text
        assert r.json()["state"] == "rejected", event.type
        assert r.json()["outcome"] == "recorded, not applied: the run is already succeeded"
        assert r.json()["run_status"] == "succeeded"
    assert _snapshot(client, engine, run_id) == before
    assert before["metrics"]["final"]["accuracy"] == 0.3
    # Kept for the record: the event log shows what came late.
    events = client.get(f"/api/v1/runs/{run_id}/events?after_seq=99").json()
    assert [(e["seq"], e["state"]) for e in events] == [(e.seq, "rejected") for e in late]


@pytest.mark.parametrize("status", [RunStatus.cancelled, RunStatus.failed])
def test_a_cancelled_or_failed_run_takes_no_progress(
    client: TestClient, engine: Engine, settings: Settings, status: RunStatus
) -> None:
    (run_id,) = insert_runs(engine, status=status)
    progress = ev.ProgressEvent(
        run_id=run_id, seq=3, data=ev.Progress(step=3, total_steps=9, epoch=0.3, loss=1.0)
    )
    r = post(client, run_id, progress, token_for(settings, run_id)).json()
    assert r["state"] == "rejected" and r["run_status"] == status.value
    assert r["outcome"] == f"recorded, not applied: the run is already {status.value}"
    assert count(engine, ProgressPoint, run_id) == 0
    assert load(engine, run_id).last_step == 0
    assert client.get(f"/api/v1/runs/{run_id}/metrics").json()["progress"] == []


# -- one event per place ------------------------------------------------------------------------


def test_a_second_id_at_a_taken_seq_is_a_409_and_changes_nothing(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    (run_id,) = insert_runs(engine, status=RunStatus.running)
    token = token_for(settings, run_id)
    first = ev.ProgressEvent(
        run_id=run_id, seq=7, data=ev.Progress(step=7, total_steps=9, epoch=0.7, loss=1.0)
    )
    assert post(client, run_id, first, token).status_code == 201
    impostor = ev.ProgressEvent(
        run_id=run_id, seq=7, data=ev.Progress(step=7, total_steps=9, epoch=0.7, loss=0.0)
    )
    r = post(client, run_id, impostor, token)
    assert r.status_code == 409, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["title"] == "Sequence number already used"
    assert first.id in r.json()["detail"]
    # The same event again is a repeat, not a conflict.
    again = post(client, run_id, first, token)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert count(engine, RunEvent, run_id) == 1
    points = client.get(f"/api/v1/runs/{run_id}/metrics").json()["progress"]
    assert [(p["step"], p["loss"]) for p in points] == [(7, 1.0)]

    # Another segment, or a platform retry of this one (attempt 1), has places of its own.
    for other in (
        ev.PhaseEvent(run_id=run_id, seq=7, segment=1, data=ev.PhaseChange(phase="training")),
        ev.PhaseEvent(run_id=run_id, seq=7, attempt=1, data=ev.PhaseChange(phase="training")),
    ):
        assert post(client, run_id, other, token).status_code == 201
    assert count(engine, RunEvent, run_id) == 3


def test_the_database_refuses_a_second_event_at_one_place(engine: Engine) -> None:
    """The constraint holds for any writer, not only for the endpoint's check."""
    (run_id,) = insert_runs(engine)
    now = datetime.now(UTC)

    def row(event_id: str, attempt: int = 0) -> RunEvent:
        return RunEvent(
            id=event_id, run_id=run_id, seq=5, segment=0, attempt=attempt, type="phase", time=now
        )

    with session_scope(engine) as s:
        s.add_all([row("a"), row("b", attempt=1)])
        s.commit()
        s.add(row("c"))
        with pytest.raises(IntegrityError):
            s.commit()


def test_evaluations_of_a_retried_attempt_replace_the_first(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    (run_id,) = insert_runs(engine, status=RunStatus.running)
    token = token_for(settings, run_id)
    for attempt, accuracy in ((0, 0.2), (1, 0.4)):
        event = ev.EvaluationEvent(
            run_id=run_id, seq=2, attempt=attempt, data=evaluation("baseline", accuracy)
        )
        assert post(client, run_id, event, token).status_code == 201
    with session_scope(engine) as s:
        row = s.get(Evaluation, (run_id, "baseline"))
        assert row is not None and row.accuracy == 0.4
