"""What a batch of events writes in bulk: its event rows and its progress points, one statement
each instead of an ORM object and a flush per event (the profile of a 1,000-event batch: 4.6 s,
nearly all of it in per-event flushes and primary-key reads).

Progress events, the bulk of any log, only collect rows here; every other event first writes what
was collected (`flush`), so its handler reads the log as it stands (an older checkpoint must see
the newer one of the same batch)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection, Float, Table, bindparam, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlmodel import Session

from api.db import utcnow
from api.events.locked_run import RUNS, LockedRun
from api.events.models import ProgressPoint, RunEvent

# Core statements on the tables, not ORM ones: the ORM's bulk path costs more per statement
# than SQLite takes to run it (the profile of single posts).
EVENTS: Table = RunEvent.__table__  # type: ignore[attr-defined]
POINTS: Table = ProgressPoint.__table__  # type: ignore[attr-defined]
_POINT_VALUES = [c.name for c in POINTS.columns if not c.primary_key]


def _upsert_points(dialect: str) -> Any:
    """INSERT ... ON CONFLICT (run_id, step) DO UPDATE: both databases spell it the same."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(POINTS)
    return stmt.on_conflict_do_update(
        index_elements=[c.name for c in POINTS.primary_key],
        set_={name: stmt.excluded[name] for name in _POINT_VALUES},
    )


class _Bulk:
    """An INSERT for many rows, compiled once per dialect and run with rows whose values it
    binds itself, through SQLAlchemy's own bind processors for the columns (so the stored values
    are what a Core INSERT stores): the Core executemany built a parameter dict per row on its
    own first, and that was half a 1,000-event batch's database time (the profile)."""

    def __init__(self, table: Table, build: Callable[[str], Any]) -> None:
        self._keys = [c.name for c in table.columns]
        self._build = build
        self._prepared: dict[str, _Prepared] = {}

    def _for(self, dialect: Dialect) -> _Prepared:
        prepared = self._prepared.get(dialect.name)
        if prepared is None:
            compiled: Any = self._build(dialect.name).compile(
                dialect=dialect, column_keys=self._keys
            )
            names = list(compiled.positiontup) if compiled.positional else list(compiled.binds)
            # Float columns bind as they are: their values come from validated models, floats
            # already, and the driver's float() of a float was a third of a progress row's bind.
            procs = [
                (i, name, proc)
                for i, name in enumerate(names)
                if not isinstance(type_ := compiled.binds[name].type, Float)
                and (proc := type_.dialect_impl(dialect).bind_processor(dialect))
            ]
            prepared = _Prepared(compiled.string, names, procs, compiled.positional)
            self._prepared[dialect.name] = prepared
        return prepared

    def run(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Every row holds every column (the statement names them all)."""
        conn.exec_driver_sql(*self._for(conn.dialect).bind(rows))


@dataclass(frozen=True)
class _Prepared:
    sql: str
    names: list[str]
    procs: list[tuple[int, str, Callable[[Any], Any]]]  # (position, name, processor)
    positional: bool

    def bind(self, rows: list[dict[str, Any]]) -> tuple[str, list[Any]]:
        # `itemgetter` takes a row's values in C; only the few typed columns (times, JSON) go
        # through a processor.
        if self.positional:
            get, values = itemgetter(*self.names), []
            for row in rows:
                value = list(get(row))
                for i, _, proc in self.procs:
                    value[i] = proc(value[i])
                values.append(tuple(value))
            return self.sql, values
        named = [dict(row) for row in rows]
        for row in named:
            for _, name, proc in self.procs:
                row[name] = proc(row[name])
        return self.sql, named


_INSERT_EVENTS = _Bulk(EVENTS, lambda _dialect: EVENTS.insert())
_UPSERT_POINTS = _Bulk(POINTS, _upsert_points)
# Built once: building a statement per post cost as much as running it.
_SET_PROGRESS = (
    update(RUNS)
    .where(RUNS.c.id == bindparam("run"))
    .values(last_step=bindparam("step"), total_steps=bindparam("total"))
)


@dataclass
class Writes:
    run_id: str
    # When this request's events arrived: one time for all of them, as they came in one body.
    received_at: datetime = field(default_factory=utcnow)
    events: list[dict[str, Any]] = field(default_factory=list)
    points: dict[int, dict[str, Any]] = field(default_factory=dict)  # by step: the last wins
    # The run's newest (step, total_steps) so far, set on the run at `flush`: setting a mapped
    # attribute per event was a third of a batch's time.
    newest: tuple[int, int] | None = None

    def advance(self, run: LockedRun, step: int, total_steps: int) -> None:
        """The run is at `step` of `total_steps` unless it has reported a later step."""
        if step >= (self.newest[0] if self.newest else run.last_step):
            self.newest = (step, total_steps)

    def flush(self, session: Session, run: LockedRun) -> None:
        conn = session.connection()
        if self.newest is not None:
            # A Core UPDATE, and the values set on the run as already stored: the ORM's flush
            # of the changed run was an eighth of a single post's time (the profile).
            step, total = self.newest
            conn.execute(_SET_PROGRESS, {"run": run.id, "step": step, "total": total})
            run.progressed(step, total)
            self.newest = None
        if self.events:
            _INSERT_EVENTS.run(conn, self.events)
            self.events = []
        if self.points:
            # Keyed by (run, step): a resumed segment re-reporting a step overwrites it.
            _UPSERT_POINTS.run(conn, list(self.points.values()))
            self.points = {}
