"""Stopping the service with local trainers (`settings.local_trainers_on_stop`).

A local trainer is a process of this machine: left alone when `tuneplane serve` stops, it runs on
under init with nobody to stop it, and its events wait in its spool until an api comes back. By
default the stopping worker instead sends each of its live trainers SIGTERM, which the trainer
handles as Cloud Run's: it saves a checkpoint and reports `segment_done`, so its run is queued
for the next segment and the next start resumes it from that checkpoint. `tuneplane serve` does
this before its server stops listening (api/cli/serve.py), so those events arrive over HTTP; an
event that did not is read from the trainer's spool here, once it has exited.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy import Engine

from api.config import Settings
from api.db import session_scope
from api.dispatch import service
from api.dispatch.base import Dispatcher, ExecutionStatus, Interruptible, owned
from api.runs.states import RunStatus

log = logging.getLogger("tuneplane.worker")
ENDED = frozenset({"succeeded", "failed", "cancelled"})
POLL_SECONDS = 0.2  # how often the process table is looked at while the trainers save


def checkpoint_and_stop(
    engine: Engine,
    dispatcher: Dispatcher,
    conclude: Callable[[str, str, ExecutionStatus], None],
    settings: Settings,
) -> list[str]:
    """SIGTERM every live execution of ours and wait up to `local_stop_grace_seconds` for them
    to end; `conclude` is the worker's (it reads a trainer's spool, then moves its run on).
    Returns the executions still running then (the next start judges them). Never raises: the
    service is stopping either way."""
    if not isinstance(dispatcher, Interruptible):
        return []  # Cloud Run executions do not depend on this process
    try:
        return _stop_all(engine, dispatcher, conclude, settings.local_stop_grace_seconds)
    except Exception:
        log.exception("stopping the local trainers failed; the next start judges them")
        return []


def _stop_all(
    engine: Engine,
    dispatcher: Interruptible,
    conclude: Callable[[str, str, ExecutionStatus], None],
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
            status = dispatcher.status(name)
            if status.state in ENDED:
                conclude(run_id, name, status)
            else:
                waiting.append((run_id, name))
        live = waiting
        if not live or time.monotonic() >= deadline:
            break
        time.sleep(POLL_SECONDS)
    for run_id, name in live:
        log.warning("stopping: %s (%s) did not end within %ss", run_id, name, grace_seconds)
    return [name for _, name in live]
