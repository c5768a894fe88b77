"""One event per place in a run's log: `run_events.attempt` (the platform's retry of a segment,
which numbers its events from the segment's start again) and a unique (run, segment, attempt,
seq). Until now a second event id at a taken seq was stored as a second event.

Rows that already share a place keep every event: within each (run, segment, seq) the one
received first keeps attempt 0 and the later ones get 1, 2, ... in the order they arrived (the
only record of which attempt sent them; a platform retry's events arrive after the failed
attempt's). Nothing is deleted.

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Standard SQL window functions: SQLite (3.25+) and PostgreSQL read it the same.
RENUMBER = sa.text(
    """
    UPDATE run_events SET attempt = (
        SELECT ranked.n FROM (
            SELECT id, ROW_NUMBER() OVER (
                PARTITION BY run_id, segment, seq ORDER BY received_at, id
            ) - 1 AS n
            FROM run_events
        ) AS ranked
        WHERE ranked.id = run_events.id
    )
    WHERE id IN (
        SELECT id FROM (
            SELECT id, ROW_NUMBER() OVER (
                PARTITION BY run_id, segment, seq ORDER BY received_at, id
            ) AS n
            FROM run_events
        ) AS dup
        WHERE dup.n > 1
    )
    """
)


def upgrade() -> None:
    with op.batch_alter_table("run_events") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer(), nullable=False, server_default="0"))
    op.execute(RENUMBER)
    with op.batch_alter_table("run_events") as batch:
        batch.alter_column("attempt", server_default=None)
        batch.create_unique_constraint(
            "uq_run_events_place", ["run_id", "segment", "attempt", "seq"]
        )


def downgrade() -> None:
    with op.batch_alter_table("run_events") as batch:
        batch.drop_constraint("uq_run_events_place", type_="unique")
        batch.drop_column("attempt")
