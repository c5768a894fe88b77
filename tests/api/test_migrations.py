"""The migrations build exactly the tables the models describe, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel, select

import api.tables  # noqa: F401  (registers every table on SQLModel.metadata)
from api.config import Settings
from api.db import _alembic_config, make_engine, migrate, session_scope
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


def insert_old_run(conn: Connection, now: datetime) -> None:
    """Run `run_1`, written with the columns every revision since 0001 has."""
    conn.execute(
        text(
            "INSERT INTO runs (id, name, notes, status, spec, model_id, dataset, gpu_type,"
            " created_at, updated_at, segment, last_step, dispatch_attempts)"
            " VALUES ('run_1', '', '', 'running', '{}', 'm', 'd', 'nvidia-l4', :now, :now,"
            " 0, 0, 0)"
        ),
        {"now": now},
    )


def test_0004_reads_each_stored_events_state_from_its_outcome(settings: Settings) -> None:
    engine = make_engine(settings.db_url)
    try:
        migrate(engine, "0003")  # the schema before the state column
        now = datetime.now(UTC)
        with engine.begin() as conn:
            insert_old_run(conn, now)
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


def test_0006_keeps_every_stored_event_and_numbers_shared_places_by_arrival(
    settings: Settings,
) -> None:
    """Before 0006 a platform retry's events (and a second id at one seq) were stored at taken
    places. The migration keeps them all: at each place the first received keeps attempt 0, the
    later ones get 1, 2, ... by arrival; then the unique constraint is created."""
    engine = make_engine(settings.db_url)
    try:
        migrate(engine, "0005")
        now = datetime.now(UTC)
        with engine.begin() as conn:
            insert_old_run(conn, now)
            rows = [  # id, segment, seq, received (seconds after now)
                ("late", 0, 1, 30),
                ("first", 0, 1, 10),
                ("middle", 0, 1, 20),
                ("alone", 0, 2, 5),
                ("next-segment", 1, 1, 40),
            ]
            for event_id, segment, seq, received in rows:
                conn.execute(
                    text(
                        "INSERT INTO run_events (id, run_id, seq, segment, type, time,"
                        " received_at, data, state, outcome) VALUES (:id, 'run_1', :seq,"
                        " :segment, 'phase', :now, :received, '{}', 'recorded', 'recorded')"
                    ),
                    {
                        "id": event_id,
                        "seq": seq,
                        "segment": segment,
                        "now": now,
                        "received": now + timedelta(seconds=received),
                    },
                )
        migrate(engine)
        with engine.connect() as conn:
            attempts = dict(conn.execute(text("SELECT id, attempt FROM run_events")).all())
        assert attempts == {"first": 0, "middle": 1, "late": 2, "alone": 0, "next-segment": 0}
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO run_events (id, run_id, seq, segment, attempt, type, time,"
                    " received_at, data, state, outcome) VALUES ('again', 'run_1', 1, 0, 1,"
                    " 'phase', :now, :now, '{}', 'recorded', 'recorded')"
                ),
                {"now": now},
            )
        # And back: the downgrade drops the column and the constraint.
        migrate_down(engine, "0005")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM run_events")).scalar_one() == 5
    finally:
        engine.dispose()


def migrate_down(engine: Engine, revision: str) -> None:
    command.downgrade(_alembic_config(engine), revision)
