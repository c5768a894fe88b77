"""API tokens: the credential of people and CI pipelines (`Authorization: Bearer tp_...`).

Only a hash of each token is stored (`api/auth/access.py` says which hash and why); the token
itself is shown once, when it is made. A revoked token keeps its row, so lists and audits still
name it.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict
from pydantic import Field as PField
from sqlalchemy import JSON, Column, UniqueConstraint
from sqlmodel import Field, SQLModel

from api.db import UTCDateTime, new_id, utcnow


class ApiToken(SQLModel, table=True):
    __tablename__ = "api_tokens"
    # Named, so that the migration and the model agree on both databases.
    __table_args__ = (UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),)

    id: str = Field(default_factory=lambda: new_id("tok"), primary_key=True, max_length=40)
    name: str = Field(max_length=100)
    # Hex SHA-256 of the whole token string; unique so that a lookup finds one row at most.
    token_hash: str = Field(max_length=64)
    # The token's first characters ("tp_Ab12"), so that a person can tell tokens apart in lists.
    hint: str = Field(max_length=20)
    scopes: list[str] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    created_by: str = Field(default="", max_length=100)
    last_used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


Scope = str  # one of api.auth.tokens.SCOPES; checked there, so the error can list them


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = PField(min_length=1, max_length=100)
    scopes: list[Scope] = PField(min_length=1, max_length=10)
    expires_in_days: float | None = PField(
        None, gt=0, le=3650, description="lifetime; none: until revoked"
    )


class TokenPublic(BaseModel):
    id: str
    name: str
    hint: str
    scopes: list[str]
    created_at: datetime
    created_by: str
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(TokenPublic):
    token: str = PField(description="the secret itself: shown this once, never stored")
