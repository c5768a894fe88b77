"""What a batch of events writes in bulk: its event rows and its progress points, one statement
each instead of an ORM object and a flush per event (the profile of a 1,000-event batch: 4.6 s,
nearly all of it in per-event flushes and primary-key reads).

Progress events, the bulk of any log, only collect rows here; every other event first writes what
was collected (`flush`), so its handler reads the log as it stands (an older checkpoint must see
the newer one of the same batch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table, bindparam, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from api.events.locked_run import RUNS, LockedRun
from api.events.models import ProgressPoint, RunEvent

# Core statements on the tables, not ORM ones: the ORM's bulk path costs more per statement
# than SQLite takes to run it (the profile of single posts).
EVENTS: Table = RunEvent.__table__  # type: ignore[attr-defined]
POINTS: Table = ProgressPoint.__table__  # type: ignore[attr-defined]
_POINT_VALUES = [c.name for c in POINTS.columns if not c.primary_key]


def _upsert_points(dialect: str) -> object:
    """INSERT ... ON CONFLICT (run_id, step) DO UPDATE: both databases spell it the same."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(POINTS)
    return stmt.on_conflict_do_update(
        index_elements=[c.name for c in POINTS.primary_key],
        set_={name: stmt.excluded[name] for name in _POINT_VALUES},
    )


_UPSERTS = {name: _upsert_points(name) for name in ("sqlite", "postgresql")}
# Built once: building a statement per post cost as much as running it.
_SET_PROGRESS = (
    update(RUNS)
    .where(RUNS.c.id == bindparam("run"))
    .values(last_step=bindparam("step"), total_steps=bindparam("total"))
)


@dataclass
class Writes:
    run_id: str
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
            conn.execute(EVENTS.insert(), self.events)
            self.events = []
        if self.points:
            # Keyed by (run, step): a resumed segment re-reporting a step overwrites it.
            conn.execute(_UPSERTS[conn.dialect.name], list(self.points.values()))  # type: ignore[call-overload]
            self.points = {}
