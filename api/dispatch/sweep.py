"""The worker's sweeps (api/dispatch/worker.py): runs and Cloud Run executions end together.

- `close_executions`: a run that ended (its trainer's final event, a cancel, a failure) while its
  recorded execution still runs has that execution cancelled: a terminal run has no live
  execution (a trainer stuck on an upload, or a platform retry started after the verdict).
- `sweep_orphans`: every live execution of our Jobs names its run (TUNEPLANE_RUN_ID); one that is
  not its run's recorded execution is cancelled, unless the run is being dispatched right now
  (its launch marker is set for that segment: the dispatch adopts or records it). That covers an
  api that died between `run_job` and recording the execution, and a segment's execution still
  running when the next segment was started.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Protocol, runtime_checkable

from sqlalchemy import Engine

from api.db import session_scope
from api.dispatch import service
from api.dispatch.base import Dispatcher, Execution, Found, Launch, owned
from api.runs.states import RunStatus

log = logging.getLogger("tuneplane.worker")
ENDED = frozenset({"succeeded", "failed", "cancelled"})


@runtime_checkable
class Adopting(Protocol):
    """A dispatcher that can find the executions a crashed api started (Cloud Run)."""

    def adopt(self, launch: Launch, since: datetime) -> Execution | None: ...

    def live_executions(self) -> list[Found]: ...


def close_executions(engine: Engine, dispatcher: Dispatcher, cancel: Callable[[str], None]) -> None:
    with session_scope(engine) as session:
        rows = service.runs_to_close(session)
    for run_id, name in rows:
        if not owned(dispatcher, name):
            continue  # another replica's execution (api/dispatch/local.py)
        try:
            status = dispatcher.status(name)
            if status.state in ENDED:
                with session_scope(engine) as session:
                    service.execution_ended(session, run_id, name, status)
            elif status.state in ("pending", "running"):  # "unknown": ask again next time
                log.warning("%s has ended but %s still runs; cancelling it", run_id, name)
                cancel(name)
        except Exception:
            log.exception("closing %s of %s failed; trying again next time", name, run_id)


def sweep_orphans(engine: Engine, dispatcher: Dispatcher, cancel: Callable[[str], None]) -> None:
    if not isinstance(dispatcher, Adopting):
        return
    live = dispatcher.live_executions()
    if not live:
        return
    with session_scope(engine) as session:
        views = service.run_views(session, {f.run_id for f in live})
    for found in live:
        view = views.get(found.run_id)
        if view is not None and _keep(view, found):
            continue
        log.warning(
            "%s serves run %s (segment %d) but is not its recorded execution; cancelling it",
            found.name,
            found.run_id,
            found.segment,
        )
        cancel(found.name)


def _keep(view: service.RunView, found: Found) -> bool:
    if view.execution_name == found.name:
        return True  # its run's own (an ended run's is close_executions' to stop, after a grace)
    # Being dispatched: the marker is set for this segment and nothing is recorded yet.
    return view.status == RunStatus.queued and view.launched and view.segment == found.segment
