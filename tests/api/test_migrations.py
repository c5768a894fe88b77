"""The migrations build exactly the tables the models describe, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine
from sqlmodel import SQLModel

import api.tables  # noqa: F401  (registers every table on SQLModel.metadata)


def test_the_migrated_schema_matches_the_models(engine: Engine) -> None:
    # `engine` is migrated to head by its fixture. A difference means a model changed without
    # a migration (or the reverse): a fresh database and a migrated one would disagree.
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == []
