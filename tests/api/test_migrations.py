"""The migrations build exactly the tables the models describe, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel, select

import api.tables  # noqa: F401  (registers every table on SQLModel.metadata)
from api.config import Settings
from api.db import make_engine, migrate, session_scope
from api.dispatch.models import ExecutionStop


def test_the_migrated_schema_matches_the_models(engine: Engine) -> None:
    # `engine` is migrated to head by its fixture. A difference means a model changed without
    # a migration (or the reverse): a fresh database and a migrated one would disagree.
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == []


# Outcomes as the api wrote them before revision 0004, and the state each one means.
OLD_OUTCOMES = {
    "applied": "applied",
    "applied: the run is running": "applied",
    "applied (the run is already failed)": "applied",
    "recorded": "recorded",
    "recorded: a newer checkpoint (step 9) is already known": "recorded",
    "recorded, not applied: the run is already succeeded": "rejected",
    "recorded, not applied: it comes from segment 0 and the run is at segment 1": "rejected",
    "deferred: the run is still queued; applied once its dispatch is recorded": "deferred",
    "replayed: applied: the run is running": "applied",
    "replayed: recorded, not applied: the run is already cancelled": "rejected",
}


def test_0004_reads_each_stored_events_state_from_its_outcome(settings: Settings) -> None:
    engine = make_engine(settings.db_url)
    try:
        migrate(engine, "0003")  # the schema before the state column
        now = datetime.now(UTC)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO runs (id, name, notes, status, spec, model_id, dataset, gpu_type,"
                    " created_at, updated_at, segment, last_step, dispatch_attempts)"
                    " VALUES ('run_1', '', '', 'running', '{}', 'm', 'd', 'nvidia-l4', :now, :now,"
                    " 0, 0, 0)"
                ),
                {"now": now},
            )
            for i, outcome in enumerate(OLD_OUTCOMES):
                conn.execute(
                    text(
                        "INSERT INTO run_events (id, run_id, seq, segment, type, time,"
                        " received_at, data, outcome)"
                        " VALUES (:id, 'run_1', :seq, 0, 'started', :now, :now, '{}', :outcome)"
                    ),
                    {"id": f"ev_{i}", "seq": i, "now": now, "outcome": outcome},
                )
        migrate(engine)
        with engine.connect() as conn:
            rows = dict(conn.execute(text("SELECT outcome, state FROM run_events")).all())
        assert rows == OLD_OUTCOMES
        # A row written after the migration must name its state: no default is left behind.
        with engine.begin() as conn, pytest.raises(IntegrityError):
            conn.execute(
                text(
                    "INSERT INTO run_events (id, run_id, seq, segment, type, time, received_at,"
                    " data, outcome) VALUES ('ev_x', 'run_1', 99, 0, 'phase', :now, :now, '{}',"
                    " 'recorded')"
                ),
                {"now": now},
            )
    finally:
        engine.dispose()


def test_0005_queues_the_stops_that_were_implied_by_ended_runs(settings: Settings) -> None:
    engine = make_engine(settings.db_url)
    try:
        migrate(engine, "0004")  # before execution stops were rows
        ended = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        # (id, status, execution_name, execution_ended): only the first implied a stop.
        runs = [
            ("run_hung", "failed", "exec-hung", False),
            ("run_seen", "succeeded", "exec-seen", True),
            ("run_live", "running", "exec-live", False),
            ("run_none", "cancelled", None, False),
        ]
        with engine.begin() as conn:
            for run_id, status, name, seen in runs:
                conn.execute(
                    text(
                        "INSERT INTO runs (id, name, notes, status, spec, model_id, dataset,"
                        " gpu_type, created_at, updated_at, finished_at, segment, last_step,"
                        " dispatch_attempts, execution_name, execution_ended) VALUES (:id, '', '',"
                        " :status, '{}', 'm', 'd', 'nvidia-l4', :now, :now, :now, 0, 0, 0, :name,"
                        " :seen)"
                    ),
                    {"id": run_id, "status": status, "name": name, "seen": seen, "now": ended},
                )
        migrate(engine)
        with session_scope(engine) as session:
            stops = session.exec(select(ExecutionStop)).all()
        assert [
            (s.run_id, s.execution_name, s.status, s.exits_by_itself, s.attempts) for s in stops
        ] == [("run_hung", "exec-hung", "pending", True, 0)]
        # The exit grace counts from the run's end, as it did before.
        assert stops[0].created_at == ended
    finally:
        engine.dispose()
