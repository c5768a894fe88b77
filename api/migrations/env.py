"""Alembic environment: the engine comes from `api.db.migrate`, never from a URL in a file."""

from alembic import context
from sqlmodel import SQLModel

import api.tables  # noqa: F401  (registers the tables on SQLModel.metadata for autogenerate)

engine = context.config.attributes["engine"]
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=SQLModel.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copy
    )
    with context.begin_transaction():
        context.run_migrations()
