"""Every callback event a trainer sent, stored once by its id (a retried post is a no-op)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel
from sqlalchemy import JSON, Column, String, UniqueConstraint
from sqlmodel import Field, SQLModel

from api.db import UTCDateTime, utcnow


class EventState(StrEnum):
    """What applying a stored event did (its `outcome` says it in words)."""

    applied = "applied"  # it changed the run or its data
    recorded = "recorded"  # kept for the record; nothing to change (a phase, an older checkpoint)
    deferred = "deferred"  # came before its run could take it; the worker applies it later
    rejected = "rejected"  # must not change the run: it is finished, or the event is stale


class RunEvent(SQLModel, table=True):
    __tablename__ = "run_events"
    # One event per place in the log: a second id for a taken seq is a 409 (api/events/service.py);
    # a platform retry of the segment numbers again under its own attempt.
    __table_args__ = (
        UniqueConstraint("run_id", "segment", "attempt", "seq", name="uq_run_events_place"),
    )
    id: str = Field(primary_key=True, max_length=64)
    run_id: str = Field(foreign_key="runs.id", index=True, max_length=40)
    seq: int
    segment: int = 0
    attempt: int = 0
    type: str = Field(max_length=20)
    time: datetime = Field(sa_type=UTCDateTime)
    received_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # A plain string column, like `runs.status`: a new state must not need a type migration.
    state: EventState = Field(default=EventState.applied, sa_type=String(20))
    # What applying it did, in words: "applied: the run is running", or why it changed nothing.
    outcome: str = Field(default="applied", max_length=500)


class RunEventPublic(BaseModel):
    id: str
    run_id: str
    # Unique with segment and attempt: a platform retry of a segment numbers its events again.
    seq: int
    segment: int
    attempt: int
    type: str
    time: datetime
    received_at: datetime
    data: dict[str, Any]
    state: EventState
    outcome: str


class ProgressPoint(SQLModel, table=True):
    """One training step. The key (run, step) is what keeps a segmented run's history free of
    duplicated steps: a resumed segment that re-reports a step overwrites, never appends."""

    __tablename__ = "progress_points"

    run_id: str = Field(foreign_key="runs.id", primary_key=True, max_length=40)
    step: int = Field(primary_key=True)
    total_steps: int
    epoch: float
    loss: float | None = None
    learning_rate: float | None = None
    samples_per_second: float | None = None
    gpu_memory_gb: float | None = None
    segment: int = 0
    time: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Evaluation(SQLModel, table=True):
    """One evaluation pass (stage `baseline` or `final`) of a run."""

    __tablename__ = "evaluations"

    run_id: str = Field(foreign_key="runs.id", primary_key=True, max_length=40)
    stage: str = Field(primary_key=True, max_length=20)
    accuracy: float
    macro_f1: float
    unknown_rate: float
    num_samples: int
    samples_per_second: float | None = None
    seconds: float | None = None
    labels: list[str] = Field(sa_column=Column(JSON, nullable=False))
    confusion_matrix: list[list[int]] = Field(sa_column=Column(JSON, nullable=False))
    # Every sample's outcome: the paired quality gate compares runs sample by sample.
    predictions: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class ClassMetric(SQLModel, table=True):
    __tablename__ = "class_metrics"

    run_id: str = Field(foreign_key="runs.id", primary_key=True, max_length=40)
    stage: str = Field(primary_key=True, max_length=20)
    label: str = Field(primary_key=True, max_length=2000)
    precision: float
    recall: float
    f1: float
    support: int
