"""The run an ingest holds the lock of: the few columns a progress event needs, read by the
statement that takes the lock, and the ORM `Run` only once an event needs more.

Why: loading the ORM run (forty columns, four of them JSON) for every post was a third of a
single post's database time (cProfile of 2,000 posts in process), and progress events, the bulk
of any log, read only the run's status and last step. A status, evaluation, checkpoint or
artifact event loads the ORM run (`orm()`), already locked, and from then on the ORM object is
what every read sees, so that a status it changed is what the next event of the batch reads.
"""

from __future__ import annotations

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session

from api.runs.models import Run
from api.runs.query import not_found
from api.runs.states import RunStatus

RUNS: Table = Run.__table__  # type: ignore[attr-defined]
_HEAD = (RUNS.c.status, RUNS.c.segment, RUNS.c.last_step)
# The lock and the read in one statement, built once. SQLite ignores FOR UPDATE: a no-op UPDATE
# takes the database's write lock, and RETURNING reads the row under it (api/db.py `lock_row`
# says the same of the ORM's way). PostgreSQL: a row lock, without a new row version.
_LOCKS = {
    "sqlite": update(RUNS)
    .where(RUNS.c.id == bindparam("key"))
    .values(updated_at=RUNS.c.updated_at)
    .returning(*_HEAD),
    "postgresql": select(*_HEAD).where(RUNS.c.id == bindparam("key")).with_for_update(),
}


class LockedRun:
    """A run whose row the caller's transaction has locked (`lock`), or an ORM run it loaded
    and locked itself (`of`)."""

    def __init__(
        self, session: Session, run_id: str, status: str, segment: int, last_step: int
    ) -> None:
        self.session, self.id = session, run_id
        self._status, self._segment, self._last_step = RunStatus(status), segment, last_step
        self._orm: Run | None = None

    @classmethod
    def lock(cls, session: Session, run_id: str) -> LockedRun:
        """Lock the run's row until the caller commits and read its head; 404 when there is
        none."""
        conn = session.connection()
        row = conn.execute(_LOCKS[conn.dialect.name], {"key": run_id}).first()
        if row is None:
            raise not_found(run_id)
        return cls(session, run_id, *row)

    @classmethod
    def of(cls, session: Session, run: Run) -> LockedRun:
        locked = cls(session, run.id, run.status, run.segment, run.last_step)
        locked._orm = run
        return locked

    @property
    def status(self) -> RunStatus:
        return RunStatus(self._orm.status) if self._orm is not None else self._status

    @property
    def segment(self) -> int:
        return self._orm.segment if self._orm is not None else self._segment

    @property
    def last_step(self) -> int:
        return self._orm.last_step if self._orm is not None else self._last_step

    def orm(self) -> Run:
        """The ORM run, loaded on first use (the row is locked already)."""
        if self._orm is None:
            run = self.session.get(Run, self.id, populate_existing=True)
            if run is None:  # locked rows are not deleted under us; a guard, not a path
                raise not_found(self.id)
            self._orm = run
        return self._orm

    def progressed(self, step: int, total_steps: int) -> None:
        """What `Writes.flush` just stored, as the run's current values (not a change for the
        ORM to write again)."""
        self._last_step = step
        if self._orm is not None:
            set_committed_value(self._orm, "last_step", step)
            set_committed_value(self._orm, "total_steps", total_steps)
