"""Applying one stored event to its run: the status events through the state machine
(`set_status`), only for the run's current segment, and the data events (progress, evaluation,
checkpoint, artifact) to the run's tables. Nothing applies to a finished run (`apply_event`).
The caller (api/events/service.py) holds the run's lock, writes `writes` and commits; a
progress event reads only the run's head (api/events/locked_run.py), every other the ORM run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlmodel import Session, col, delete, select

from api.events.locked_run import LockedRun
from api.events.models import ClassMetric, Evaluation, EventState, RunEvent
from api.events.writes import Writes
from api.runs.finish import finish_run
from api.runs.models import Run
from api.runs.states import TERMINAL, RunStatus
from api.runs.status import set_status
from trainer.contract import events as ev

# What an evaluation event's metrics become in the table (per-class rows go to their own).
_EVALUATION_COLUMNS = frozenset(Evaluation.model_fields) - {"run_id", "stage", "created_at"}

# What applying an event did: its state, and the same in words (stored as `outcome`).
Applied = tuple[EventState, str]
APPLIED, RECORDED = EventState.applied, EventState.recorded


def apply_event(
    session: Session, run: LockedRun, event: ev.Event, writes: Writes, data: dict[str, Any]
) -> Applied:
    """Apply `event` to `run` (locked by the caller) and say what that did. A finished run's
    data never changes: status, metrics, evaluations, predictions, checkpoint and artifacts stay
    as they were when it finished, whatever arrives later (a token that leaked from an execution
    must not rewrite a champion's final metrics). Such an event is kept, as `rejected`.
    `data` is the event's data as JSON (the caller stores it too)."""
    status = run.status
    if status in TERMINAL:
        return EventState.rejected, f"recorded, not applied: the run is already {status.value}"
    if isinstance(event, ev.ProgressEvent):
        return _on_progress(run, event, writes, data)
    writes.flush(session, run)  # what the batch collected so far, for the handler to read
    handler = _HANDLERS[event.type]
    return handler(session, run.orm(), event)


def _status_guard(run: Run, event: ev.Event) -> Applied | None:
    """Why a status event must not move the run (yet), or None if it may."""
    rejected = EventState.rejected
    if event.segment != run.segment:
        return rejected, (
            f"recorded, not applied: it comes from segment {event.segment} and the run is at "
            f"segment {run.segment}"
        )
    if run.status == RunStatus.queued:
        # The trainer's first post landed before the worker recorded the dispatch: the worker
        # applies it then (replay_deferred).
        return (
            EventState.deferred,
            "deferred: the run is still queued; applied once its dispatch is recorded",
        )
    return None


def _on_started(session: Session, run: Run, event: ev.Event) -> Applied:
    assert isinstance(event, ev.StartedEvent)
    if (why := _status_guard(run, event)) is not None:
        return why
    attempt = f" (platform retry, attempt {event.data.attempt})" if event.data.attempt else ""
    if run.status == RunStatus.dispatched:
        set_status(session, run, RunStatus.running, f"segment {run.segment} started{attempt}")
        return APPLIED, "applied: the run is running"
    return RECORDED, f"recorded: the run is already {run.status}{attempt}"


def _on_segment_done(session: Session, run: Run, event: ev.Event) -> Applied:
    assert isinstance(event, ev.SegmentDoneEvent)
    if (why := _status_guard(run, event)) is not None:
        return why
    data = event.data
    run.last_step = max(run.last_step, data.step)
    run.checkpoint_uri = data.checkpoint_uri
    if run.status == RunStatus.cancelling:
        finish_run(
            session, run, RunStatus.cancelled, f"cancelled; checkpoint at step {data.step} kept"
        )
        return APPLIED, "applied: the cancel is finished (the trainer saved a checkpoint)"
    set_status(
        session,
        run,
        RunStatus.queued,
        f"segment {run.segment} done at step {data.step}; waiting for the next segment",
    )
    run.segment += 1
    # The next segment is a fresh dispatch: no backoff, no claim, a full set of attempts.
    run.not_before = None
    run.dispatch_attempts = 0
    run.claimed_by = run.claim_expires_at = None
    session.add(run)
    return APPLIED, f"applied: queued for segment {run.segment}"


def _on_completed(session: Session, run: Run, event: ev.Event) -> Applied:
    assert isinstance(event, ev.CompletedEvent)
    if (why := _status_guard(run, event)) is not None:
        return why
    run.last_step = max(run.last_step, event.data.step)
    finish_run(session, run, RunStatus.succeeded, "completed")
    return APPLIED, "applied: the run succeeded"


def _on_failed(session: Session, run: Run, event: ev.Event) -> Applied:
    assert isinstance(event, ev.FailedEvent)
    if (why := _status_guard(run, event)) is not None:
        return why
    if run.status == RunStatus.cancelling:
        # Stopping it is what made it fail (or it failed while stopping): either way, cancelled.
        finish_run(
            session, run, RunStatus.cancelled, f"cancelled (the trainer said: {event.data.error})"
        )
        return APPLIED, "applied: the cancel is finished"
    finish_run(session, run, RunStatus.failed, f"the trainer failed: {event.data.error}")
    return APPLIED, "applied: the run failed"


def _on_phase(session: Session, run: Run, event: ev.Event) -> Applied:
    return RECORDED, "recorded"


def _on_progress(
    run: LockedRun, event: ev.ProgressEvent, writes: Writes, values: dict[str, Any]
) -> Applied:
    data = event.data
    point = {"run_id": run.id, **values, "segment": event.segment, "time": event.time}
    writes.points[data.step] = point
    writes.advance(run, data.step, data.total_steps)
    return APPLIED, "applied"


def _on_evaluation(session: Session, run: Run, event: ev.Event) -> Applied:
    assert isinstance(event, ev.EvaluationEvent)
    data = event.data
    values: dict[str, Any] = {
        name: value
        for name, value in data.model_dump(mode="json").items()
        if name in _EVALUATION_COLUMNS
    }
    row = session.get(Evaluation, (run.id, data.stage))
    if row is None:
        row = Evaluation(run_id=run.id, stage=data.stage, **values)
    else:
        for name, value in values.items():
            setattr(row, name, value)
    session.add(row)
    session.exec(
        delete(ClassMetric).where(
            col(ClassMetric.run_id) == run.id, col(ClassMetric.stage) == data.stage
        )
    )
    seen: set[str] = set()
    for cls in data.per_class:
        if cls.label in seen:  # the primary key would refuse a label listed twice
            continue
        seen.add(cls.label)
        session.add(ClassMetric(run_id=run.id, stage=data.stage, **cls.model_dump()))
    if data.stage == "baseline":
        run.baseline_accuracy, run.baseline_macro_f1 = data.accuracy, data.macro_f1
    else:
        run.final_accuracy, run.final_macro_f1 = data.accuracy, data.macro_f1
    session.add(run)
    return APPLIED, "applied"


def _on_checkpoint(session: Session, run: Run, event: ev.Event) -> Applied:
    assert isinstance(event, ev.CheckpointEvent)
    # Out of order, an older checkpoint must not replace a newer one as the place to resume.
    newest = _newest_checkpoint_step(session, run.id, exclude=event.id)
    if newest is not None and newest > event.data.step:
        return RECORDED, f"recorded: a newer checkpoint (step {newest}) is already known"
    run.checkpoint_uri = event.data.uri
    session.add(run)
    return APPLIED, "applied"


def _on_artifact(session: Session, run: Run, event: ev.Event) -> Applied:
    assert isinstance(event, ev.ArtifactEvent)
    # The run links to its output directory; single files are kept in the event record.
    if event.data.kind == "output_dir" or run.artifact_uri is None:
        run.artifact_uri = event.data.uri
        session.add(run)
        return APPLIED, "applied"
    return RECORDED, "recorded"


def _newest_checkpoint_step(session: Session, run_id: str, exclude: str) -> int | None:
    rows = session.exec(
        select(RunEvent.data).where(
            RunEvent.run_id == run_id,
            col(RunEvent.type).in_(("checkpoint", "segment_done")),
            RunEvent.id != exclude,
        )
    ).all()
    steps = [int(d["step"]) for d in rows if isinstance(d, dict) and "step" in d]
    return max(steps) if steps else None


_HANDLERS: dict[str, Callable[[Session, Run, Any], Applied]] = {
    "started": _on_started,
    "phase": _on_phase,
    "evaluation": _on_evaluation,
    "checkpoint": _on_checkpoint,
    "artifact": _on_artifact,
    "segment_done": _on_segment_done,
    "completed": _on_completed,
    "failed": _on_failed,
}
