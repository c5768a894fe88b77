"""Ingesting the trainer's callback events: store each once, apply what it says, never reopen.

Every event is stored by its id, exactly once, whatever it did: its `outcome` says what applying
it changed or why it changed nothing. Data events (progress, evaluation, checkpoint, artifact)
are applied even to a finished run, because the trainer's reporter may deliver them after its
final event (re-sent from a spool after an api outage) and they are still true. Events that
change the status go through the state machine (`set_status`) and only for the run's current
segment: a late `started` of an earlier segment must not move a run that is waiting for its next
one, and a finished run never changes status again.

Concurrency: events of one run are serialized by a lock on its row (a row lock on PostgreSQL, the
write lock on SQLite) taken before the event is inserted, so two posts of the same event, or of
two events that both move the run, cannot interleave. The insert is also guarded by the primary
key, which catches an id reused by another run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, select

from api.errors import Problem
from api.events.models import ClassMetric, Evaluation, EventState, ProgressPoint, RunEvent
from api.runs.finish import finish_run
from api.runs.models import Run
from api.runs.service import lock_run
from api.runs.states import TERMINAL, RunStatus
from api.runs.status import set_status
from trainer.contract import events as ev

_STATUS_TYPES = ("started", "segment_done", "completed", "failed")
# What an evaluation event's metrics become in the table (per-class rows go to their own).
_EVALUATION_COLUMNS = frozenset(Evaluation.model_fields) - {"run_id", "stage", "created_at"}


@dataclass(frozen=True)
class IngestResult:
    event_id: str
    duplicate: bool  # True: this id was stored before; nothing was applied again
    outcome: str
    run_status: RunStatus
    state: EventState = EventState.applied


# What applying an event did: its state, and the same in words (stored as `outcome`).
Applied = tuple[EventState, str]
APPLIED, RECORDED = EventState.applied, EventState.recorded


def ingest(session: Session, run_id: str, event: ev.Event) -> IngestResult:
    """Store `event` for run `run_id` (once) and apply it. Commits. Raises Problem 404 for an
    unknown run, 422 when the event names another run, 409 when its id belongs to another run."""
    if event.run_id != run_id:
        raise Problem(
            422,
            "Event for another run",
            f"the event's run_id {event.run_id!r} does not match the run in the URL {run_id!r}",
        )
    data, nulled = _finite_data(event)
    if nulled:  # stored and applied as kept
        event = ev.EVENT_ADAPTER.validate_python({**event.model_dump(), "data": data})
    run = lock_run(session, run_id)
    existing = session.get(RunEvent, event.id)
    if existing is not None:
        status = RunStatus(run.status)
        session.rollback()
        return _duplicate(existing, run_id, status)

    row = RunEvent(
        id=event.id,
        run_id=run_id,
        seq=event.seq,
        segment=event.segment,
        type=event.type,
        time=event.time,
        data=data,
        outcome="",
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        # Only another run's event can hold this id (ours are serialized by the run lock).
        session.rollback()
        clash = session.get(RunEvent, event.id)
        if clash is None:
            raise
        current = session.get(Run, run_id)
        return _duplicate(clash, run_id, RunStatus(current.status if current else run.status))
    row.state, outcome = _apply(session, run, event)
    row.outcome = outcome[:500]
    session.add(row)
    session.commit()
    return IngestResult(event.id, False, row.outcome, RunStatus(run.status), row.state)


def replay_deferred(session: Session, run: Run) -> list[str]:
    """Apply again, in order, the status events of the run's current segment that arrived
    before the run could take them. The caller holds the run's lock and commits."""
    rows = session.exec(
        select(RunEvent)
        .where(
            RunEvent.run_id == run.id,
            RunEvent.segment == run.segment,
            col(RunEvent.type).in_(_STATUS_TYPES),
            col(RunEvent.state) == EventState.deferred,
        )
        .order_by(col(RunEvent.seq), col(RunEvent.received_at))
    ).all()
    outcomes = []
    for row in rows:
        event = ev.EVENT_ADAPTER.validate_python(
            {
                "id": row.id,
                "run_id": row.run_id,
                "seq": row.seq,
                "segment": row.segment,
                "type": row.type,
                "time": row.time,
                "data": row.data,
            }
        )
        row.state, outcome = _apply(session, run, event)
        row.outcome = ("replayed: " + outcome)[:500]
        session.add(row)
        outcomes.append(row.outcome)
    return outcomes


def _finite_data(event: ev.Event) -> tuple[dict[str, Any], bool]:
    """The event's data as JSON, where NaN and infinity have no place: an optional number
    (a diverged loss) becomes null, a required one (a metric, an epoch) refuses the event.
    Returns the data and whether anything was nulled."""
    data: dict[str, Any] = event.data.model_dump(mode="json")
    fields = type(event.data).model_fields
    bad: list[str] = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(path)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")

    nulled = False
    for name, value in data.items():
        optional = not fields[name].is_required() and fields[name].default is None
        if isinstance(value, float) and not math.isfinite(value) and optional:
            data[name], nulled = None, True
        else:
            walk(value, f"data.{name}")
    if bad:
        raise Problem(
            422,
            "Invalid event",
            f"{', '.join(bad[:5])}: not a finite number",
            errors=[{"field": path, "message": "not a finite number"} for path in bad[:50]],
        )
    return data, nulled


def _duplicate(existing: RunEvent, run_id: str, status: RunStatus) -> IngestResult:
    if existing.run_id != run_id:
        raise Problem(
            409,
            "Event id already used",
            f"event id {existing.id!r} belongs to another run; every event needs a unique id",
        )
    return IngestResult(existing.id, True, existing.outcome, status, EventState(existing.state))


# -- applying one event --------------------------------------------------------------------------


def _apply(session: Session, run: Run, event: ev.Event) -> Applied:
    handler = _HANDLERS[event.type]
    return handler(session, run, event)


def _status_guard(run: Run, event: ev.Event) -> Applied | None:
    """Why a status event must not move the run (yet), or None if it may."""
    status = RunStatus(run.status)
    rejected = EventState.rejected
    if status in TERMINAL:
        return rejected, f"recorded, not applied: the run is already {status.value}"
    if event.segment != run.segment:
        return rejected, (
            f"recorded, not applied: it comes from segment {event.segment} and the run is at "
            f"segment {run.segment}"
        )
    if status == RunStatus.queued:
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


def _data_outcome(run: Run) -> Applied:
    status = RunStatus(run.status)
    return APPLIED, (
        f"applied (the run is already {status.value})" if status in TERMINAL else "applied"
    )


def _on_phase(session: Session, run: Run, event: ev.Event) -> Applied:
    return RECORDED, "recorded"


def _on_progress(session: Session, run: Run, event: ev.Event) -> Applied:
    assert isinstance(event, ev.ProgressEvent)
    data = event.data
    # Keyed by (run, step): a resumed segment re-reporting a step overwrites it, never appends.
    point = session.get(ProgressPoint, (run.id, data.step)) or ProgressPoint(
        run_id=run.id, step=data.step, total_steps=data.total_steps, epoch=data.epoch
    )
    for name, value in data.model_dump(mode="json").items():
        setattr(point, name, value)
    point.segment = event.segment
    point.time = event.time
    session.add(point)
    if data.step >= run.last_step:
        run.last_step = data.step
        run.total_steps = data.total_steps
    session.add(run)
    return _data_outcome(run)


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
    return _data_outcome(run)


def _on_checkpoint(session: Session, run: Run, event: ev.Event) -> Applied:
    assert isinstance(event, ev.CheckpointEvent)
    # Out of order, an older checkpoint must not replace a newer one as the place to resume.
    newest = _newest_checkpoint_step(session, run.id, exclude=event.id)
    if newest is not None and newest > event.data.step:
        return RECORDED, f"recorded: a newer checkpoint (step {newest}) is already known"
    run.checkpoint_uri = event.data.uri
    session.add(run)
    return _data_outcome(run)


def _on_artifact(session: Session, run: Run, event: ev.Event) -> Applied:
    assert isinstance(event, ev.ArtifactEvent)
    # The run links to its output directory; single files are kept in the event record.
    if event.data.kind == "output_dir" or run.artifact_uri is None:
        run.artifact_uri = event.data.uri
        session.add(run)
        return _data_outcome(run)
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
    "progress": _on_progress,
    "evaluation": _on_evaluation,
    "checkpoint": _on_checkpoint,
    "artifact": _on_artifact,
    "segment_done": _on_segment_done,
    "completed": _on_completed,
    "failed": _on_failed,
}
