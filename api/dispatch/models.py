"""Execution stops: one row per execution that must not go on running, an outbox row (the shape
of api/outbox.py, like a webhook delivery).

A row is written in the unit of work that decides it: the run's end (`finish_run`, while the
run's execution has not been seen ended) or a dispatch that started an execution its run no
longer wanted. The dispatch worker drains the rows (api/dispatch/stops.py), so a crash between
that commit and the dispatcher's cancel leaves the intent in the database, never a GPU running
for an ended run.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import UniqueConstraint
from sqlmodel import Field

from api.db import UTCDateTime, new_id
from api.outbox import OutboxRow


class ExecutionStop(OutboxRow, table=True):
    __tablename__ = "execution_stops"
    # One stop per execution: asking twice is asking once. Named, so that the migration and the
    # model agree on both databases.
    __table_args__ = (UniqueConstraint("execution_name", name="uq_execution_stops_execution_name"),)

    id: str = Field(default_factory=lambda: new_id("stp"), primary_key=True, max_length=40)
    run_id: str = Field(foreign_key="runs.id", index=True, max_length=40)
    execution_name: str = Field(max_length=500)
    reason: str = Field(max_length=500)
    # Its trainer reported the run's end (or its segment's): it exits on its own within seconds,
    # so it is cancelled only if it still runs after the worker's exit grace (a hung upload, a
    # platform retry that started after the verdict).
    exits_by_itself: bool
    # status: pending -> done, once the execution is seen ended (however it ended)
    cancel_asked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    ended_as: str | None = Field(default=None, max_length=20)  # the execution's last state
    done_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
