"""Stopping executions whose run no longer wants them: `request_stop` records the intent inside
the caller's unit of work (no network call in a transaction), `stop_due` is the dispatch
worker's drain of those rows (api/dispatch/models.py).

For each due stop the drain asks the dispatcher how the execution is: ended (however: on its
own, cancelled, gone from the platform), the stop is done and the run's execution marked seen
ended; still running, the dispatcher is asked to cancel it, and asked again every `reask` until
it has ended. A trainer that reported its run's end is given `exit_grace` to exit by itself
first. Cancelling is idempotent in every dispatcher, and cancelling an execution that has
already ended is no error. A dispatcher error is retried with backoff; nothing gives up, because
an execution left running costs a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from api.db import session_scope, utcnow
from api.dispatch.base import ENDED, Dispatcher, DispatchError, ExecutionStatus, owned
from api.dispatch.models import ExecutionStop
from api.outbox import PENDING, backoff, claim_due
from api.runs.models import Run

log = logging.getLogger("tuneplane.worker")

LEASE = timedelta(minutes=2)
BACKOFF_FIRST_SECONDS, BACKOFF_MOST_SECONDS = 5.0, 300.0


def request_stop(
    session: Session, run_id: str, execution_name: str, reason: str, *, exits_by_itself: bool
) -> None:
    """Record that `execution_name` of run `run_id` must stop (the caller commits). Asking for
    an execution already asked for changes nothing."""
    if session.exec(
        select(ExecutionStop.id).where(ExecutionStop.execution_name == execution_name)
    ).first():
        return
    session.add(
        ExecutionStop(
            run_id=run_id,
            execution_name=execution_name,
            reason=reason[:500],
            exits_by_itself=exits_by_itself,
        )
    )


def stop_due(
    engine: Engine, dispatcher: Dispatcher, *, exit_grace: timedelta, reask: timedelta
) -> int:
    """Act once on every due stop; returns how many were acted on."""
    acted = 0
    for stop_id in claim_due(engine, ExecutionStop, LEASE, limit=50):
        with session_scope(engine) as session:
            stop = session.get(ExecutionStop, stop_id)
        # The session is closed: the dispatcher is asked outside any transaction.
        if stop is None or stop.status != PENDING:
            continue
        if not owned(dispatcher, stop.execution_name):
            # Another replica's local trainer (api/dispatch/local.py): only its owner can see
            # and stop it, so the claim is handed back at once for the owner's next pass.
            with session_scope(engine) as session:
                session.execute(
                    update(ExecutionStop)
                    .where(col(ExecutionStop.id) == stop_id)
                    .values(claimed_until=None)
                )
                session.commit()
            continue
        status: ExecutionStatus | None = None
        try:
            status = dispatcher.status(stop.execution_name)
            step = _act(dispatcher, stop, status, exit_grace, reask)
        except Exception as exc:  # DispatchError, or a bug: either way, try again later
            if not isinstance(exc, DispatchError):
                log.exception("stopping %s failed", stop.execution_name)
            error = f"{exc.kind}: {exc.message}" if isinstance(exc, DispatchError) else repr(exc)
            step = _Step(None, stop.cancel_asked_at, error[:2000])
        with session_scope(engine) as session:
            _record(session, stop_id, status, step)
        acted += 1
    return acted


@dataclass(frozen=True)
class _Step:
    look_again_at: datetime | None  # None: it ended, or the backoff decides
    cancel_asked_at: datetime | None
    error: str | None = None


def _act(
    dispatcher: Dispatcher,
    stop: ExecutionStop,
    status: ExecutionStatus,
    exit_grace: timedelta,
    reask: timedelta,
) -> _Step:
    """Cancel the execution if it still runs and is due for that."""
    asked = stop.cancel_asked_at
    if status.state in ENDED:
        return _Step(None, asked)
    if status.state == "unknown":  # not knowing is not ending: ask again after a backoff
        return _Step(None, asked, status.message or "its state is unknown for now")
    now = utcnow()
    grace_until = stop.created_at + exit_grace
    if stop.exits_by_itself and now < grace_until:
        return _Step(grace_until, asked)
    if asked is None or now - asked >= reask:
        log.warning(
            "%s still runs (%s); cancelling it",
            *(stop.execution_name, stop.reason),
            extra={"run_id": stop.run_id, "execution": stop.execution_name},
        )
        dispatcher.cancel(stop.execution_name)
        asked = now
    return _Step(asked + reask, asked)


def _record(session: Session, stop_id: str, status: ExecutionStatus | None, step: _Step) -> None:
    stop = session.get(ExecutionStop, stop_id)
    assert stop is not None  # stops are never deleted
    now = utcnow()
    stop.attempts += 1
    stop.claimed_until = None
    stop.cancel_asked_at = step.cancel_asked_at
    stop.last_error = step.error
    if status is not None and status.state in ENDED:
        stop.status, stop.ended_as, stop.done_at = "done", status.state, now
        # The run's execution is seen ended: nothing more to watch (unless a later segment's
        # execution is current by now).
        session.execute(
            update(Run)
            .where(col(Run.id) == stop.run_id, col(Run.execution_name) == stop.execution_name)
            .values(execution_ended=True)
        )
    elif step.look_again_at is not None:
        stop.next_attempt_at = step.look_again_at
    else:
        wait = backoff(stop.attempts, BACKOFF_FIRST_SECONDS, BACKOFF_MOST_SECONDS)
        stop.next_attempt_at = now + wait
    session.add(stop)
    session.commit()
