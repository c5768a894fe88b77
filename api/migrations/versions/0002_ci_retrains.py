"""CI retrains: API tokens, run templates and their versions, champions, webhook deliveries,
and the template / CI context / quality gate of each run.

Revision ID: 0002
Revises: 0001

Adding columns goes through `batch_alter_table`, which is a plain ALTER TABLE on PostgreSQL and a
copy-and-rename on SQLite (which cannot add an indexed column in place in every version).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

import api.db

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC = api.db.UTCDateTime(timezone=True)


def _str(length: int) -> AutoString:
    return AutoString(length=length)


def upgrade() -> None:
    # Long on purpose: one block per table in the order of their foreign keys, read as the
    # schema this revision makes (and never edited once released).
    op.create_table(
        "api_tokens",
        sa.Column("id", _str(40), nullable=False),
        sa.Column("name", _str(100), nullable=False),
        sa.Column("token_hash", _str(64), nullable=False),
        sa.Column("hint", _str(20), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("created_by", _str(100), nullable=False),
        sa.Column("last_used_at", UTC, nullable=True),
        sa.Column("expires_at", UTC, nullable=True),
        sa.Column("revoked_at", UTC, nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )
    op.create_table(
        "run_templates",
        sa.Column("name", _str(100), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
        sa.Column("deleted_at", UTC, nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "run_template_versions",
        sa.Column("name", _str(100), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("description", _str(2000), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("gates", sa.JSON(), nullable=False),
        sa.Column("webhooks", sa.JSON(), nullable=False),
        sa.Column("auto_promote", sa.Boolean(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("created_by", _str(100), nullable=False),
        sa.ForeignKeyConstraint(["name"], ["run_templates.name"]),
        sa.PrimaryKeyConstraint("name", "version"),
    )
    op.create_table(
        "champions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("template_name", _str(100), nullable=False),
        sa.Column("run_id", _str(40), nullable=False),
        sa.Column("promoted_at", UTC, nullable=False),
        sa.Column("promoted_by", _str(100), nullable=False),
        sa.Column("note", _str(2000), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"]),
        sa.ForeignKeyConstraint(["template_name"], ["run_templates.name"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("champions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_champions_run_id"), ["run_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_champions_template_name"), ["template_name"], unique=False
        )

    op.create_table(
        "webhook_deliveries",
        sa.Column("id", _str(40), nullable=False),
        sa.Column("run_id", _str(40), nullable=False),
        sa.Column("template_name", _str(100), nullable=False),
        sa.Column("template_version", sa.Integer(), nullable=False),
        sa.Column("url", _str(2000), nullable=False),
        sa.Column("event", _str(40), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", _str(20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTC, nullable=False),
        sa.Column("claimed_until", UTC, nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", _str(2000), nullable=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("delivered_at", UTC, nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_webhook_deliveries_run_id"), ["run_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_webhook_deliveries_status"), ["status"], unique=False)

    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("template_name", _str(100), nullable=True))
        batch_op.add_column(sa.Column("template_version", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("ci", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("gate_status", _str(20), nullable=True))
        batch_op.add_column(sa.Column("gate_reasons", sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f("ix_runs_template_name"), ["template_name"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_runs_template_name"))
        batch_op.drop_column("gate_reasons")
        batch_op.drop_column("gate_status")
        batch_op.drop_column("ci")
        batch_op.drop_column("template_version")
        batch_op.drop_column("template_name")

    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_deliveries_status"))
        batch_op.drop_index(batch_op.f("ix_webhook_deliveries_run_id"))
    op.drop_table("webhook_deliveries")

    with op.batch_alter_table("champions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_champions_template_name"))
        batch_op.drop_index(batch_op.f("ix_champions_run_id"))
    op.drop_table("champions")
    op.drop_table("run_template_versions")
    op.drop_table("run_templates")
    op.drop_table("api_tokens")
