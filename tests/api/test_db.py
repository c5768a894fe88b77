"""api/db.py: what its column handling stores comes back as it went in, on SQLite and
PostgreSQL (JSON columns written by pydantic-core's serializer, not `json.dumps`; UTC times
through the SQLite processor's fast path for `datetime.UTC` values and its general path for
others), and every spelling of an in-memory SQLite URL makes an engine."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, select, text

from api.db import make_engine, migrate, session_scope
from api.events.models import RunEvent
from api.runs.seed import insert_runs

DATA = {
    "text": "Birman, Ragdoll, é ü 猫 \u2028",
    "numbers": [0, -1, 2.5, 1e-05, 1.7976931348623157e308, 2**53 + 1],
    "nothing": None,
    "flags": [True, False],
    "nested": {"1": {"deeper": ["x", {"y": []}]}},
}
WHEN = datetime(2026, 12, 4, 18, 0, 0, 123456, tzinfo=UTC)


def _store(
    engine: Engine, event_id: str, when: datetime = WHEN, data: dict[str, Any] = DATA
) -> RunEvent:
    (run_id,) = insert_runs(engine)
    with session_scope(engine) as session:
        session.add(
            RunEvent(
                id=event_id, run_id=run_id, seq=0, type="phase", time=when, data=data, state="x"
            )
        )
        session.commit()
    with session_scope(engine) as session:
        return session.exec(select(RunEvent).where(RunEvent.id == event_id)).scalar_one()


def test_json_column_round_trips(engine: Engine) -> None:
    assert _store(engine, "json", WHEN).data == DATA


def test_a_string_that_utf8_cannot_hold_is_still_stored(engine: Engine) -> None:
    # A lone surrogate: what `surrogateescape` makes of a file name's undecodable bytes.
    data = {"label": b"caf\xe9".decode("utf-8", "surrogateescape")}
    assert _store(engine, "lone", data=data).data == data


def test_utc_times_round_trip_to_the_microsecond(engine: Engine) -> None:
    assert _store(engine, "utc", WHEN).time == WHEN


def test_other_offsets_are_stored_as_the_same_instant(engine: Engine) -> None:
    # Not datetime.UTC itself: the general path, which converts.
    plus_two = WHEN.astimezone(timezone(timedelta(hours=2)))
    assert _store(engine, "plus-two", plus_two).time == WHEN
    zero_offset = WHEN.replace(tzinfo=timezone(timedelta(0), "Z"))
    assert _store(engine, "zero", zero_offset).time == WHEN


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_urls_make_an_engine(url: str) -> None:
    # `sqlite://` (no path) once reached the file-pool arguments and raised a TypeError.
    engine = make_engine(url)
    migrate(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM runs")).scalar_one() == 0
    engine.dispose()
