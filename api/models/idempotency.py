"""Idempotency keys of creating POSTs: same key and same body give the same resource."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from api.models.types import UTCDateTime, utcnow


class IdempotencyKey(SQLModel, table=True):
    __tablename__ = "idempotency_keys"

    # The key is scoped by route ("POST /api/v1/runs"), so one key can't collide across routes.
    scope: str = Field(primary_key=True, max_length=200)
    key: str = Field(primary_key=True, max_length=200)
    request_hash: str = Field(max_length=64)
    resource_id: str | None = Field(default=None, max_length=40)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
