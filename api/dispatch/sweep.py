"""The worker's orphan sweep (api/dispatch/worker.py): no Cloud Run execution runs for nothing.

The executions the api knows it must stop (their run ended, or they started after their run
stopped being the worker's) are stopped through the rows `finish_run` and `record_execution`
queue (api/dispatch/stops.py). What no row names is found here: every live execution of our
Jobs names its run (TUNEPLANE_RUN_ID); one that is not its run's recorded execution is
cancelled, unless the run is being dispatched right now (its launch marker is set for that
segment: the dispatch adopts or records it). That covers an api that died between `run_job`
and recording the execution, and a segment's execution still running when the next segment was
started.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Protocol, runtime_checkable

from sqlalchemy import Engine

from api.db import session_scope
from api.dispatch import service
from api.dispatch.base import Dispatcher, Execution, Found, Launch
from api.runs.states import RunStatus

log = logging.getLogger("tuneplane.worker")


@runtime_checkable
class Adopting(Protocol):
    """A dispatcher that can find the executions a crashed api started (Cloud Run)."""

    def adopt(self, launch: Launch, since: datetime) -> Execution | None: ...

    def live_executions(self) -> list[Found]: ...


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
        return True  # its run's own (an ended run's is stopped through its stop row)
    # Being dispatched: the marker is set for this segment and nothing is recorded yet.
    return view.status == RunStatus.queued and view.launched and view.segment == found.segment
