"""What the trainer measured, in tables the api and the dashboard query directly."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from api.models.types import UTCDateTime, utcnow


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
