"""Execution stops as rows (an outbox, like webhook deliveries): `execution_stops` holds each
execution that must stop because its run ended, written in the unit of work that ends the run.

Until now the intent was implied by a finished run whose `execution_ended` is false; each such
run gets its row here, so an upgrade loses no stop that was due.

Revision ID: 0005
Revises: 0004
"""

import uuid
from collections.abc import Sequence
from datetime import UTC as TZ
from datetime import datetime

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

import api.db

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC = api.db.UTCDateTime(timezone=True)


def _str(length: int) -> AutoString:
    return AutoString(length=length)


def upgrade() -> None:
    stops = op.create_table(
        "execution_stops",
        sa.Column("id", _str(40), nullable=False),
        sa.Column("run_id", _str(40), nullable=False),
        sa.Column("execution_name", _str(500), nullable=False),
        sa.Column("reason", _str(500), nullable=False),
        sa.Column("exits_by_itself", sa.Boolean(), nullable=False),
        sa.Column("status", _str(20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTC, nullable=False),
        sa.Column("claimed_until", UTC, nullable=True),
        sa.Column("last_error", _str(2000), nullable=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("cancel_asked_at", UTC, nullable=True),
        sa.Column("ended_as", _str(20), nullable=True),
        sa.Column("done_at", UTC, nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("execution_name", name="uq_execution_stops_execution_name"),
    )
    with op.batch_alter_table("execution_stops", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_execution_stops_run_id"), ["run_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_execution_stops_status"), ["status"], unique=False)

    runs = sa.table(
        "runs",
        sa.column("id", AutoString()),
        sa.column("status", AutoString()),
        sa.column("execution_name", AutoString()),
        sa.column("execution_ended", sa.Boolean()),
        sa.column("finished_at", UTC),
    )
    pending = op.get_bind().execute(
        sa.select(runs.c.id, runs.c.status, runs.c.execution_name, runs.c.finished_at).where(
            runs.c.status.in_(["succeeded", "failed", "cancelled"]),
            runs.c.execution_ended.is_(False),
            runs.c.execution_name.is_not(None),
        )
    )
    now = datetime.now(TZ)
    rows = [
        {
            "id": f"stp_{uuid.uuid4().hex[:20]}",
            "run_id": run_id,
            "execution_name": name,
            "reason": f"its run {run_id} is {status}",
            # As the old rule had it: the trainer's exit grace counts from the run's end.
            "exits_by_itself": True,
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": finished_at or now,
        }
        for run_id, status, name, finished_at in pending
    ]
    if rows:
        op.bulk_insert(stops, rows)


def downgrade() -> None:
    with op.batch_alter_table("execution_stops", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_execution_stops_status"))
        batch_op.drop_index(batch_op.f("ix_execution_stops_run_id"))
    op.drop_table("execution_stops")
