"""Stopping the service with local trainers (`settings.local_trainers_on_stop`).

A local trainer is a process of this machine: left alone when `tuneplane serve` stops, it runs on
under init with nobody to stop it, and its events wait in its spool until an api comes back. By
default the stopping worker instead sends each of its live trainers SIGTERM, which the trainer
handles as Cloud Run's: it saves a checkpoint and reports `segment_done`, so its run is queued
for the next segment and the next start resumes it from that checkpoint. `tuneplane serve` does
this before its server stops listening (api/cli/serve.py), so those events arrive over HTTP; an
event that did not is read from the trainer's spool here, once it has exited. A trainer that
ended without its `segment_done` (SIGTERM came before it could handle it, while it started up)
leaves its run queued for the same segment, never failed: the stop was ours, not its fault.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy import Engine
from sqlmodel import Session

from api.config import Settings
from api.db import session_scope
from api.dispatch import service
from api.dispatch.base import Dispatcher, Interruptible, owned
from api.runs.service import lock_run
from api.runs.states import RunStatus
from api.runs.status import set_status

log = logging.getLogger("tuneplane.worker")
ENDED = frozenset({"succeeded", "failed", "cancelled"})
POLL_SECONDS = 0.2  # how often the process table is looked at while the trainers save


def checkpoint_and_stop(
    engine: Engine,
    dispatcher: Dispatcher,
    take_leftovers: Callable[[str, str], None],
    settings: Settings,
) -> list[str]:
    """SIGTERM every live execution of ours and wait up to `local_stop_grace_seconds` for them
    to end; `take_leftovers` is the worker's (it ingests what a trainer left in its spool).
    Returns the executions still running then (the next start judges them). Never raises: the
    service is stopping either way."""
    if not isinstance(dispatcher, Interruptible):
        return []  # Cloud Run executions do not depend on this process
    try:
        return _stop_all(engine, dispatcher, take_leftovers, settings.local_stop_grace_seconds)
    except Exception:
        log.exception("stopping the local trainers failed; the next start judges them")
        return []


def _stop_all(
    engine: Engine,
    dispatcher: Interruptible,
    take_leftovers: Callable[[str, str], None],
    grace_seconds: float,
) -> list[str]:
    with session_scope(engine) as session:
        rows = service.runs_with_executions(session, (RunStatus.dispatched, RunStatus.running))
    live = [
        (run_id, name)
        for run_id, name in rows
        if name and owned(dispatcher, name) and dispatcher.status(name).state not in ENDED
    ]
    for run_id, name in live:
        log.info("stopping: %s (%s) saves a checkpoint and stops", run_id, name)
        dispatcher.interrupt(name)
    deadline = time.monotonic() + grace_seconds
    while live:
        waiting = []
        for run_id, name in live:
            if dispatcher.status(name).state in ENDED:
                take_leftovers(run_id, name)
                with session_scope(engine) as session:
                    requeue_interrupted(session, run_id, name)
            else:
                waiting.append((run_id, name))
        live = waiting
        if not live or time.monotonic() >= deadline:
            break
        time.sleep(POLL_SECONDS)
    for run_id, name in live:
        log.warning("stopping: %s (%s) did not end within %ss", run_id, name, grace_seconds)
    return [name for _, name in live]


def requeue_interrupted(session: Session, run_id: str, execution_name: str) -> bool:
    """The execution we interrupted has ended. Its run moved on by its own events (queued by
    `segment_done`, or ended); if it is still active, queue it for the same segment. True when
    it was queued here."""
    run = lock_run(session, run_id)
    ours = run.execution_name == execution_name
    if ours:
        run.execution_ended = True
    queued = ours and run.status in (RunStatus.dispatched, RunStatus.running)
    if queued:
        set_status(
            session,
            run,
            RunStatus.queued,
            f"the service stopped before segment {run.segment}'s trainer saved a checkpoint; "
            "the segment starts again at the next start",
        )
        run.launched_at = run.claimed_by = run.claim_expires_at = None
    session.add(run)
    session.commit()
    return queued
