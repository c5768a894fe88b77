"""Every callback event a trainer sent, stored once by its id (a retried post is a no-op)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from api.models.types import UTCDateTime, utcnow


class RunEvent(SQLModel, table=True):
    __tablename__ = "run_events"
    id: str = Field(primary_key=True, max_length=64)
    run_id: str = Field(foreign_key="runs.id", index=True, max_length=40)
    # Ordering only, not unique: a retried task of the same segment numbers its events again.
    seq: int
    segment: int = 0
    type: str = Field(max_length=20)
    time: datetime = Field(sa_type=UTCDateTime)
    received_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # What applying it did: "applied", or why it changed nothing ("run is succeeded", ...).
    outcome: str = Field(default="applied", max_length=500)


class RunEventPublic(BaseModel):
    id: str
    run_id: str
    # Ordering only, not unique: a retried task of the same segment numbers its events again.
    seq: int
    segment: int
    type: str
    time: datetime
    received_at: datetime
    data: dict[str, Any]
    outcome: str
