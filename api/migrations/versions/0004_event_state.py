"""The application state of each stored event as data: `run_events.state` (applied, recorded,
deferred, rejected), read from the words of each existing row's `outcome`, which until now was
the only record of it (the worker found deferred events by the prefix "deferred").

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The outcomes api/events/service.py wrote before this revision, by the state each one means;
# the first matching prefix wins, and a replayed event ("replayed: ...") has its replay's state.
# Anything else was applied ("applied", "applied: ...", "applied (the run is already ...)").
PREFIXES = (
    ("recorded, not applied", "rejected"),
    ("recorded", "recorded"),
    ("deferred", "deferred"),
)


def _state_case() -> sa.Case[str]:
    outcome = sa.column("outcome", AutoString())
    whens = []
    for prefix, state in PREFIXES:
        for head in ("", "replayed: "):
            whens.append((outcome.like(f"{head}{prefix}%"), state))
    return sa.case(*whens, else_="applied")


def upgrade() -> None:
    with op.batch_alter_table("run_events") as batch:
        batch.add_column(
            sa.Column("state", AutoString(length=20), nullable=False, server_default="applied")
        )
    events = sa.table("run_events", sa.column("state", AutoString()), sa.column("outcome"))
    op.execute(events.update().values(state=_state_case()))
    # The default served the rows that existed; new rows always name their state.
    with op.batch_alter_table("run_events") as batch:
        batch.alter_column("state", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("run_events") as batch:
        batch.drop_column("state")
