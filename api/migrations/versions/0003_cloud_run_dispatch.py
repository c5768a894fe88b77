"""Cloud Run dispatch bookkeeping: the launch marker set before `run_job`, whether the recorded
execution has been seen ended, and since when a run waits for a GPU or for IAM.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import api.db

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC = api.db.UTCDateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("launched_at", UTC, nullable=True))
        # Existing runs: their executions are taken as ended (nothing to close).
        batch_op.add_column(
            sa.Column("execution_ended", sa.Boolean(), nullable=False, server_default=sa.true())
        )
        batch_op.add_column(sa.Column("waiting_since", UTC, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("waiting_since")
        batch_op.drop_column("execution_ended")
        batch_op.drop_column("launched_at")
