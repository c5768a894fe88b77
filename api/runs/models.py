"""Runs, in SQLModel's multiple-models pattern: `RunBase` holds what a person writes,
`Run` is the table, `RunCreate` the request body, `RunPublic` the response."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, computed_field, field_validator
from pydantic import Field as PField
from sqlalchemy import JSON, Column, String
from sqlmodel import Field, SQLModel

from api.db import UTCDateTime, new_id, utcnow
from api.runs.states import RunStatus, duration_seconds
from trainer.contract.spec import RunSpec

# A tag, as every way of making a run checks it (api/runs/service.py `check_tags`) and the
# runs list filters by it.
TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/=+-]{0,63}$")
Tag = Annotated[str, PField(min_length=1, max_length=64)]


class RunBase(SQLModel):
    name: str = Field(default="", max_length=200)
    notes: str = Field(default="", max_length=10_000)


class Run(RunBase, table=True):
    __tablename__ = "runs"

    id: str = Field(default_factory=lambda: new_id("run"), primary_key=True, max_length=40)
    # A plain string column, not a database enum: adding a state must not need a type migration.
    status: RunStatus = Field(default=RunStatus.queued, sa_type=String(20), index=True)
    status_reason: str | None = Field(default=None, max_length=4000)
    spec: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    # Copied out of the spec so that lists can filter on them with an index.
    model_id: str = Field(max_length=300, index=True)
    dataset: str = Field(max_length=500)
    gpu_type: str = Field(max_length=40)
    parent_id: str | None = Field(default=None, foreign_key="runs.id", max_length=40)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # What the dispatcher knows: its handle on the execution and where the log is.
    execution_name: str | None = Field(default=None, max_length=500)
    log_uri: str | None = Field(default=None, max_length=1000)
    segment: int = 0
    last_step: int = 0
    total_steps: int | None = None
    checkpoint_uri: str | None = Field(default=None, max_length=1000)
    artifact_uri: str | None = Field(default=None, max_length=1000)
    baseline_accuracy: float | None = None
    baseline_macro_f1: float | None = None
    final_accuracy: float | None = None
    final_macro_f1: float | None = None
    estimate: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    # Dispatch bookkeeping: a claim is a lease in the row, never an in-memory flag.
    dispatch_attempts: int = 0
    not_before: datetime | None = Field(default=None, sa_type=UTCDateTime)
    claimed_by: str | None = Field(default=None, max_length=100)
    claim_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # Set (committed) right before `run_job` for the current segment, cleared once its execution
    # is recorded: a run found with it set may have an execution nobody recorded (the api died
    # in between), which the next dispatch adopts instead of starting a second one.
    launched_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # False from dispatch until the recorded execution is seen ended: a run that ends before
    # then has the stop of its execution queued (api/runs/finish.py, api/dispatch/stops.py).
    execution_ended: bool = Field(default=True)
    # When the run began waiting for a GPU (stock-out, quota) or for IAM to propagate; it fails
    # once `cloud_run_wait_seconds` have passed since.
    waiting_since: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # Runs started from a template (CI retrains): which version, from where, and its quality
    # gate. No foreign key: templates are never deleted, only hidden (api/templates/models.py).
    template_name: str | None = Field(default=None, max_length=100, index=True)
    template_version: int | None = None
    ci: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    # passed | failed | not_applicable once the run has ended; null while it has not.
    gate_status: str | None = Field(default=None, max_length=20)
    # [{"check", "outcome", "reason", ...figures}], the reasons in words (api/templates/gates.py).
    gate_reasons: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON))

    @property
    def run_spec(self) -> RunSpec:
        return RunSpec.model_validate(self.spec)


class RunTag(SQLModel, table=True):
    __tablename__ = "run_tags"

    run_id: str = Field(foreign_key="runs.id", primary_key=True, max_length=40)
    tag: str = Field(primary_key=True, max_length=64, index=True)


class RunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: RunSpec
    name: str = PField("", max_length=200)
    tags: list[Tag] = PField(default_factory=list, max_length=20)
    notes: str = PField("", max_length=10_000)

    @field_validator("tags")
    @classmethod
    def _check_tags(cls, tags: list[str]) -> list[str]:
        bad = [t for t in tags if not TAG.match(t)]
        if bad:
            raise ValueError(
                f"bad tag {bad[0]!r}: letters, digits and _.:/=+- only, starting with a letter "
                "or digit, at most 64 characters"
            )
        return list(dict.fromkeys(tags))


class RetrainRequest(BaseModel):
    """A new run from an old one's spec; `overrides` replaces single spec fields."""

    model_config = ConfigDict(extra="forbid")

    overrides: dict[str, Any] = PField(default_factory=dict)
    name: str | None = PField(None, max_length=200)
    tags: list[Tag] | None = PField(None, max_length=20)
    notes: str | None = PField(None, max_length=10_000)


class RunPublic(RunBase):
    id: str
    status: RunStatus
    status_reason: str | None
    spec: RunSpec
    tags: list[str]
    model_id: str
    dataset: str
    gpu_type: str
    parent_id: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    execution_name: str | None
    log_uri: str | None
    segment: int
    last_step: int
    total_steps: int | None
    artifact_uri: str | None
    baseline_accuracy: float | None
    baseline_macro_f1: float | None
    final_accuracy: float | None
    final_macro_f1: float | None
    estimate: dict[str, Any] | None
    template_name: str | None = None
    template_version: int | None = None
    ci: dict[str, Any] | None = None
    gate_status: str | None = None
    gate_reasons: list[dict[str, Any]] | None = None

    @computed_field(  # type: ignore[prop-decorator]
        description="seconds from the trainer's start to the run's end (or now, while active); "
        "null before it started (api/runs/states.py duration_seconds)"
    )
    @property
    def duration_seconds(self) -> float | None:
        seconds = duration_seconds(self)
        return None if seconds is None else round(seconds, 3)


class RunsPage(BaseModel):
    items: list[RunPublic]
    next_cursor: str | None = PField(
        None, description="pass as `cursor` for the next page; null on the last page"
    )
