"""The outbox shape, shared by every consequence of a decision that must reach the world outside
the database: a row written in the unit of work that makes the decision (so a crash leaves both
or neither), and a loop that drains due rows, leasing each so that two api replicas never act on
one at once, and retrying with backoff.

Two tables have it: webhook deliveries (api/notify/models.py), and the stops of executions whose
run has ended (api/dispatch/models.py).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, or_, update
from sqlmodel import Field, SQLModel, col, select

from api.db import UTCDateTime, session_scope, utcnow

PENDING = "pending"


class OutboxRow(SQLModel):
    """The columns of an outbox table (a table model adds its id and what it carries)."""

    # pending -> the table's own final states (delivered, failed, done)
    status: str = Field(default=PENDING, max_length=20, index=True)
    attempts: int = 0
    next_attempt_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    # A drainer's lease on the row, so that two api replicas never act on it at once.
    claimed_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_error: str | None = Field(default=None, max_length=2000)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


def claim_due(engine: Engine, model: type[OutboxRow], lease: timedelta, limit: int) -> list[str]:
    """Ids of due pending rows of `model` that this process now holds a lease on, the longest
    due first."""
    table: Any = model  # a table model: its attributes are columns
    now = utcnow()
    free = or_(col(table.claimed_until).is_(None), col(table.claimed_until) < now)
    claimed: list[str] = []
    with session_scope(engine) as session:
        due = session.exec(
            select(table.id)
            .where(table.status == PENDING, col(table.next_attempt_at) <= now, free)
            .order_by(col(table.next_attempt_at))
            .limit(limit)
        ).all()
        for row_id in due:
            # A conditional UPDATE: of two replicas racing for a row, exactly one changes it.
            result = session.execute(
                update(table)
                .where(col(table.id) == row_id, table.status == PENDING, free)
                .values(claimed_until=now + lease)
            )
            session.commit()
            if result.rowcount == 1:  # type: ignore[attr-defined]
                claimed.append(row_id)
    return claimed


def backoff(attempts: int, first_seconds: float, most_seconds: float) -> timedelta:
    """How long to wait after the `attempts`-th failed attempt: doubling from `first_seconds`,
    at most `most_seconds`."""
    return timedelta(seconds=min(first_seconds * 2 ** max(attempts - 1, 0), most_seconds))
