"""The callback endpoint: per-run tokens, limits, storing each event once, applying it through the
state machine, out-of-order and duplicated posts, concurrency, and the metrics it feeds."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import func, select

from api.auth.callback import mint_token
from api.config import Settings
from api.db import session_scope
from api.events.models import ClassMetric, Evaluation, ProgressPoint, RunEvent
from api.runs.models import Run
from api.runs.states import RunStatus
from tests.api.factories import evaluation, full_history, insert_runs, token_for
from tests.conftest import LiveServer
from trainer.contract import events as ev
from trainer.contract.events import MAX_EVENT_BYTES


def post(
    client: TestClient | httpx.Client, run_id: str, event: ev.Event | str, token: str | None
) -> httpx.Response:
    body = event if isinstance(event, str) else event.model_dump_json()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return client.post(f"/api/v1/runs/{run_id}/events", content=body, headers=headers)


def started(run_id: str, seq: int = 0, segment: int = 0) -> ev.Event:
    return ev.StartedEvent(run_id=run_id, seq=seq, segment=segment)


def load(engine: Engine, run_id: str) -> Run:
    with session_scope(engine) as s:
        run = s.get(Run, run_id)
        assert run is not None
        return run


def count(engine: Engine, model: Any, run_id: str) -> int:
    with session_scope(engine) as s:
        return s.exec(select(func.count()).select_from(model).where(model.run_id == run_id)).one()


# -- the credential ----------------------------------------------------------------------------


def test_token_checks(client: TestClient, engine: Engine, settings: Settings) -> None:
    run_id, other = insert_runs(engine, 2)
    event = started(run_id)

    r = post(client, run_id, event, None)
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert post(client, run_id, event, "not-a-token").status_code == 401
    assert (
        client.post(
            f"/api/v1/runs/{run_id}/events",
            content=event.model_dump_json(),
            headers={"Authorization": "Basic dXNlcjpwYXNz"},
        ).status_code
        == 401
    )

    # Forged: right shape, signed with another key.
    forged = mint_token(b"another key", run_id, _in(3600))
    r = post(client, run_id, event, forged)
    assert r.status_code == 401 and "signature" in r.json()["detail"]
    # Tampered: a genuine token of another run with this run's id pasted in.
    genuine = token_for(settings, other)
    r = post(client, run_id, event, genuine.replace(other, run_id))
    assert r.status_code == 401
    # Genuine, but another run's.
    r = post(client, run_id, event, genuine)
    assert r.status_code == 403 and "another run" in r.json()["detail"]
    # Expired.
    expired = mint_token(settings.signing_key, run_id, _in(-1))
    r = post(client, run_id, event, expired)
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    # Nothing was stored by any of those.
    assert count(engine, RunEvent, run_id) == 0

    r = post(client, run_id, event, token_for(settings, run_id))
    assert r.status_code == 201, r.text
    assert r.json() == {
        "id": event.id,
        "duplicate": False,
        "state": "applied",
        "outcome": "applied: the run is running",
        "run_status": "running",
    }


def test_api_tokens_do_not_open_the_callback(client: TestClient, engine: Engine) -> None:
    """The endpoint takes only the run's own credential, never a user's API token."""
    (run_id,) = insert_runs(engine)
    r = post(client, run_id, started(run_id), "tp_" + "a" * 43)
    assert r.status_code == 401


def _in(seconds: float) -> Any:
    from datetime import UTC, datetime, timedelta

    return datetime.now(UTC) + timedelta(seconds=seconds)


# -- the body --------------------------------------------------------------------------------------


def test_body_checks(client: TestClient, engine: Engine, settings: Settings) -> None:
    (run_id,) = insert_runs(engine)
    token = token_for(settings, run_id)

    r = post(client, run_id, "x" * (MAX_EVENT_BYTES + 1), token)
    assert r.status_code == 413
    assert r.headers["content-type"] == "application/problem+json"
    assert f"{MAX_EVENT_BYTES:,}" in r.json()["detail"]

    r = post(client, run_id, "{not json", token)
    assert r.status_code == 422 and r.json()["title"] == "Invalid event"

    bad = started(run_id).model_dump(mode="json")
    bad["type"] = "exploded"
    r = client.post(
        f"/api/v1/runs/{run_id}/events", json=bad, headers={"Authorization": f"Bearer {token}"}
    )
    assert r.status_code == 422 and r.json()["errors"]

    progress = ev.ProgressEvent(
        run_id=run_id, seq=1, data=ev.Progress(step=1, total_steps=2, epoch=0.5)
    ).model_dump(mode="json")
    progress["data"]["step"] = -3
    r = client.post(
        f"/api/v1/runs/{run_id}/events",
        json=progress,
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 422
    assert any(e["field"].endswith("data.step") for e in r.json()["errors"])

    # The body names another run than the URL (the token is this run's).
    r = post(client, run_id, started("run_someone_else"), token)
    assert r.status_code == 422 and "does not match" in r.json()["detail"]

    # A token for a run that does not exist.
    r = post(client, "run_missing", started("run_missing"), token_for(settings, "run_missing"))
    assert r.status_code == 404
    assert count(engine, RunEvent, run_id) == 0


MAX_INT = 2**31 - 1  # the INTEGER columns the api stores these numbers in (api/models)


def _progress_body(run_id: str) -> dict[str, Any]:
    return ev.ProgressEvent(
        run_id=run_id, seq=1, data=ev.Progress(step=1, total_steps=2, epoch=0.5)
    ).model_dump(mode="json")


def _evaluation_body(run_id: str) -> dict[str, Any]:
    return ev.EvaluationEvent(run_id=run_id, seq=1, data=evaluation("final", 0.5)).model_dump(
        mode="json"
    )


@pytest.mark.parametrize(
    ("make", "path", "value"),
    [
        # Valid ISO times whose UTC value is beyond datetime's range, and one with no offset.
        (_progress_body, ("time",), "9999-12-31T23:59:59-23:59"),
        (_progress_body, ("time",), "0001-01-01T00:00:00+14:00"),
        (_progress_body, ("time",), "2025-01-01T12:00:00"),
        # Numbers past the columns that hold them (SQLite would keep them, PostgreSQL not).
        (_progress_body, ("seq",), MAX_INT + 1),
        (_progress_body, ("segment",), ev.MAX_SEGMENT + 1),
        (_progress_body, ("data", "step"), 2**62),
        (_progress_body, ("data", "total_steps"), MAX_INT + 1),
        (_evaluation_body, ("data", "num_samples"), MAX_INT + 1),
        (_evaluation_body, ("data", "per_class", 0, "support"), 2**62),
    ],
)
def test_out_of_range_envelope_and_numbers_are_a_422_naming_the_field(
    client: TestClient,
    engine: Engine,
    settings: Settings,
    make: Any,
    path: tuple[str | int, ...],
    value: Any,
) -> None:
    (run_id,) = insert_runs(engine)
    body = make(run_id)
    *parents, last = path
    target = body
    for key in parents:
        target = target[key]
    target[last] = value
    r = client.post(
        f"/api/v1/runs/{run_id}/events",
        json=body,
        headers={"Authorization": f"Bearer {token_for(settings, run_id)}"},
    )
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    field = ".".join(map(str, path))
    assert any(e["field"].endswith(field) for e in r.json()["errors"]), r.json()
    assert count(engine, RunEvent, run_id) == 0


def test_the_largest_numbers_events_allow_are_stored(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    # The bounds above fit the columns: at the limit, both databases store the event.
    (run_id,) = insert_runs(engine)
    token = token_for(settings, run_id)
    progress = ev.ProgressEvent(
        run_id=run_id,
        seq=MAX_INT,
        segment=ev.MAX_SEGMENT,
        data=ev.Progress(step=MAX_INT, total_steps=MAX_INT, epoch=1.0),
    )
    metrics = evaluation("final", 0.5).model_copy(update={"num_samples": MAX_INT})
    metrics.per_class[0] = metrics.per_class[0].model_copy(update={"support": MAX_INT})
    final = ev.EvaluationEvent(run_id=run_id, seq=MAX_INT - 1, data=metrics)
    for event in (progress, final):
        r = post(client, run_id, event, token)
        assert r.status_code == 201, r.text
    run = load(engine, run_id)
    assert (run.last_step, run.total_steps) == (MAX_INT, MAX_INT)
    with session_scope(engine) as s:
        stored = s.get(Evaluation, (run_id, "final"))
        assert stored is not None and stored.num_samples == MAX_INT
        supports = s.exec(select(ClassMetric.support).where(ClassMetric.run_id == run_id)).all()
        assert MAX_INT in supports


def test_an_event_id_of_another_run_is_a_conflict(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    first, second = insert_runs(engine, 2)
    event = started(first)
    assert post(client, first, event, token_for(settings, first)).status_code == 201
    copy = ev.StartedEvent(id=event.id, run_id=second, seq=0)
    r = post(client, second, copy, token_for(settings, second))
    assert r.status_code == 409
    assert load(engine, second).status == RunStatus.dispatched


# -- applying events -------------------------------------------------------------------------------


def test_a_whole_execution_stores_everything_and_succeeds(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    (run_id,) = insert_runs(engine)
    token = token_for(settings, run_id)
    history = full_history(run_id, steps=4)
    for event in history:
        r = post(client, run_id, event, token)
        assert r.status_code == 201, r.text

    run = load(engine, run_id)
    assert run.status == RunStatus.succeeded and run.finished_at is not None
    assert run.started_at is not None
    assert (run.baseline_accuracy, run.final_accuracy) == (0.1, 0.9)
    assert run.final_macro_f1 == pytest.approx(0.89)
    assert (run.last_step, run.total_steps) == (4, 4)
    assert run.checkpoint_uri == f"/ck/{run_id}/step-4"
    assert run.artifact_uri == f"/out/{run_id}"
    assert count(engine, RunEvent, run_id) == len(history)
    assert count(engine, ClassMetric, run_id) == 4  # two labels, two stages

    metrics = client.get(f"/api/v1/runs/{run_id}/metrics").json()
    assert [p["step"] for p in metrics["progress"]] == [1, 2, 3, 4]
    assert metrics["progress"][0]["loss"] == 2.5
    assert metrics["phase"] == "final_eval"
    assert metrics["baseline"]["accuracy"] == 0.1 and metrics["final"]["accuracy"] == 0.9
    assert [c["label"] for c in metrics["final"]["per_class"]] == ["one", "zero"]
    assert metrics["final"]["confusion_matrix"][0] == [5, 0, 0]
    assert metrics["final"]["predictions"] is None
    with_predictions = client.get(f"/api/v1/runs/{run_id}/metrics?predictions=true").json()
    assert len(with_predictions["final"]["predictions"]) == 3
    later = client.get(f"/api/v1/runs/{run_id}/metrics?since_step=2").json()
    assert [p["step"] for p in later["progress"]] == [3, 4]
    assert client.get("/api/v1/runs/run_missing/metrics").status_code == 404
    assert client.get(f"/api/v1/runs/{run_id}/metrics?since_step=-5").status_code == 422


def test_duplicates_and_any_order_before_the_end_leave_one_copy_and_the_same_state(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    """Every event twice, in a scrambled order, before the final one (the reporter sends its
    final event last, from the queue or the spool, both in order): the same state as in order.
    After the final event nothing applies (test_terminal.py)."""
    in_order, shuffled = insert_runs(engine, 2)
    for event in full_history(in_order):
        post(client, in_order, event, token_for(settings, in_order))

    *history, final = full_history(shuffled)
    token = token_for(settings, shuffled)
    posts = history * 2  # every event twice...
    random.Random(7).shuffle(posts)  # ...in a scrambled order
    codes = [post(client, shuffled, e, token).status_code for e in [*posts, final, final]]
    assert codes.count(201) == len(history) + 1 and codes.count(200) == len(history) + 1

    assert count(engine, RunEvent, shuffled) == len(history) + 1
    a, b = load(engine, in_order), load(engine, shuffled)
    for field in (
        "status",
        "baseline_accuracy",
        "final_accuracy",
        "final_macro_f1",
        "last_step",
        "total_steps",
    ):
        assert getattr(b, field) == getattr(a, field), field
    assert (b.artifact_uri, b.checkpoint_uri) == (f"/out/{shuffled}", f"/ck/{shuffled}/step-4")
    assert count(engine, ProgressPoint, shuffled) == 4
    assert count(engine, Evaluation, shuffled) == 2


def test_a_repeat_answers_200_with_the_first_outcome(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    (run_id,) = insert_runs(engine)
    token = token_for(settings, run_id)
    event = started(run_id)
    first = post(client, run_id, event, token)
    again = post(client, run_id, event, token)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["duplicate"] is True
    assert again.json()["outcome"] == first.json()["outcome"]


def test_a_finished_run_records_late_events_and_never_reopens(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    (run_id,) = insert_runs(engine)
    token = token_for(settings, run_id)
    fail = ev.FailedEvent(run_id=run_id, seq=5, data=ev.Failed(error="CUDA out of memory"))
    assert post(client, run_id, fail, token).json()["run_status"] == "failed"
    assert load(engine, run_id).status_reason == "the trainer failed: CUDA out of memory"

    late = [
        started(run_id, seq=0),
        ev.CompletedEvent(run_id=run_id, seq=6),
        ev.SegmentDoneEvent(
            run_id=run_id, seq=7, data=ev.SegmentDone(step=3, checkpoint_uri="/ck")
        ),
    ]
    for event in late:
        r = post(client, run_id, event, token).json()
        assert r["run_status"] == "failed"
        assert r["outcome"] == "recorded, not applied: the run is already failed"
        assert r["state"] == "rejected"
    # Data that arrives late is kept for the record, but a finished run's data never changes.
    progress = ev.ProgressEvent(
        run_id=run_id, seq=3, data=ev.Progress(step=3, total_steps=9, epoch=0.3)
    )
    r = post(client, run_id, progress, token).json()
    assert (r["state"], r["outcome"]) == (
        "rejected",
        "recorded, not applied: the run is already failed",
    )
    run = load(engine, run_id)
    assert run.status == RunStatus.failed and run.last_step == 0 and run.segment == 0
    assert count(engine, RunEvent, run_id) == 5
    assert count(engine, ProgressPoint, run_id) == 0


def test_segment_done_queues_the_next_segment_and_old_segments_cannot_move_it(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    (run_id,) = insert_runs(engine, status=RunStatus.running, dispatch_attempts=2)
    token = token_for(settings, run_id)
    done = ev.SegmentDoneEvent(
        run_id=run_id, seq=40, data=ev.SegmentDone(step=50, checkpoint_uri="/ck/step-50")
    )
    assert post(client, run_id, done, token).json()["outcome"] == "applied: queued for segment 1"
    run = load(engine, run_id)
    assert (run.status, run.segment, run.checkpoint_uri) == (RunStatus.queued, 1, "/ck/step-50")
    assert run.last_step == 50 and run.dispatch_attempts == 0 and run.finished_at is None

    # Segment 0's events still on their way must not move the queued run.
    late_fail = ev.FailedEvent(run_id=run_id, seq=41, data=ev.Failed(error="SIGTERM"))
    outcome = post(client, run_id, late_fail, token).json()["outcome"]
    assert "segment 0" in outcome and "not applied" in outcome
    # An older checkpoint does not replace the newer one.
    old = ev.CheckpointEvent(run_id=run_id, seq=30, data=ev.Checkpoint(step=25, uri="/ck/step-25"))
    assert "newer checkpoint" in post(client, run_id, old, token).json()["outcome"]
    assert load(engine, run_id).checkpoint_uri == "/ck/step-50"
    assert load(engine, run_id).status == RunStatus.queued


def test_a_run_being_cancelled_ends_cancelled_when_its_trainer_stops(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    saved, crashed = insert_runs(engine, 2, status=RunStatus.cancelling)
    done = ev.SegmentDoneEvent(
        run_id=saved, seq=9, data=ev.SegmentDone(step=7, checkpoint_uri="/ck/7")
    )
    post(client, saved, done, token_for(settings, saved))
    failed = ev.FailedEvent(run_id=crashed, seq=9, data=ev.Failed(error="terminated"))
    post(client, crashed, failed, token_for(settings, crashed))
    assert load(engine, saved).status == RunStatus.cancelled
    assert load(engine, saved).segment == 0  # no next segment for a cancelled run
    assert load(engine, crashed).status == RunStatus.cancelled


def test_a_status_event_before_the_dispatch_is_recorded_is_deferred(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    (run_id,) = insert_runs(engine, status=RunStatus.queued)
    r = post(client, run_id, started(run_id), token_for(settings, run_id)).json()
    assert r["outcome"].startswith("deferred") and r["run_status"] == "queued"
    assert r["state"] == "deferred"


def test_evaluation_replaces_per_class_rows_of_its_stage(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    (run_id,) = insert_runs(engine, status=RunStatus.running)
    token = token_for(settings, run_id)
    first = ev.EvaluationEvent(run_id=run_id, seq=1, data=evaluation("baseline", 0.2))
    # A platform retry of the task (its attempt 1) evaluates again at the same seq, with other
    # labels: the newest wins whole.
    second = ev.EvaluationEvent(
        run_id=run_id, seq=1, attempt=1, data=evaluation("baseline", 0.3, labels=("a", "b", "c"))
    )
    post(client, run_id, first, token)
    post(client, run_id, second, token)
    metrics = client.get(f"/api/v1/runs/{run_id}/metrics").json()
    assert metrics["baseline"]["accuracy"] == 0.3
    assert [c["label"] for c in metrics["baseline"]["per_class"]] == ["a", "b", "c"]
    assert load(engine, run_id).baseline_accuracy == 0.3


# -- concurrency over a real server ----------------------------------------------------------------


def test_concurrent_posts_store_one_copy_each_and_a_consistent_state(
    live_server: LiveServer, engine: Engine, settings: Settings
) -> None:
    """Many clients at once (the reporter's retries, a spool re-sent while the live queue
    drains): on PostgreSQL each request has its own transaction and connection."""
    run_ids = insert_runs(engine, 3)
    # The final events go last (a trainer sends its final event after the others): after it,
    # nothing applies, so only what came before it may arrive in any order.
    work: list[tuple[str, ev.Event]] = []
    finals: list[tuple[str, ev.Event]] = []
    for run_id in run_ids:
        *history, final = full_history(run_id, steps=6)
        work += [(run_id, e) for e in history] * 3
        finals += [(run_id, final)] * 3
    random.Random(3).shuffle(work)
    tokens = {run_id: token_for(settings, run_id) for run_id in run_ids}

    limits = httpx.Limits(max_connections=12)
    with (
        httpx.Client(base_url=live_server.url, timeout=60, limits=limits) as c,
        ThreadPoolExecutor(max_workers=12) as pool,
    ):
        # No stopwatch: a deadlock would show as a request past the client's timeout.
        def send(item: tuple[str, ev.Event]) -> int:
            return post(c, item[0], item[1], tokens[item[0]]).status_code

        codes = list(pool.map(send, work)) + list(pool.map(send, finals))
    assert set(codes) <= {200, 201}, codes
    assert codes.count(201) == (len(work) + len(finals)) // 3
    for run_id in run_ids:
        run = load(engine, run_id)
        assert run.status == RunStatus.succeeded
        assert (run.baseline_accuracy, run.final_accuracy, run.last_step) == (0.1, 0.9, 6)
        assert count(engine, RunEvent, run_id) == len(full_history(run_id, steps=6))
        assert count(engine, ProgressPoint, run_id) == 6


def test_the_run_page_shows_the_step_plan_of_the_training_phase(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    (run_id,) = insert_runs(engine)
    token = token_for(settings, run_id)
    plan = "micro-batch 8 x accumulation 2, checkpointing none, weights nf4: fastest fitting"
    for event in (
        started(run_id),
        ev.PhaseEvent(run_id=run_id, seq=1, data=ev.PhaseChange(phase="training", detail=plan)),
    ):
        assert post(client, run_id, event, token).status_code == 201
    page = client.get(f"/runs/{run_id}")
    assert page.status_code == 200
    assert f"training: {plan}" in page.text
