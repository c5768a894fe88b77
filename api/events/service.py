"""Ingesting the trainer's callback events: store each once, apply what it says, never reopen.

The event log is a contract (README, "Callback events"):
- every event is stored by its id, exactly once, whatever it did; a repeat of a stored id changes
  nothing and answers what the first post did (the reporter retries, so repeats are normal);
- one event per place in the log, (run, segment, attempt, seq): a second id at a taken place is
  refused (409, "Sequence number already used"), also by a unique constraint in the database;
- events apply in the order they are given, and nothing applies to a finished run
  (api/events/apply.py): a late event is kept as `rejected` and changes no data.

A batch (`ingest_batch`) is one transaction: the run's lock, one query for the ids and one for the
places already taken, the events applied in order, one commit. A single post is a batch of one.

Concurrency: events of one run are serialized by a lock on its row (a row lock on PostgreSQL, the
write lock on SQLite) taken before anything is read, so two posts of the same event, or of two
events that both move the run, cannot interleave. On SQLite the posts of this process also queue
on a lock of their own first: waiting there costs nothing, where SQLite's busy handler sleeps in
growing steps (up to 100 ms) while another connection of ours holds the write lock (the profile
of 8 clients posting: p99 657 ms, most of it in those sleeps).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from sqlalchemy import ARRAY, JSON, Engine, String, and_, any_, bindparam, column, func, or_
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from api.db import session_scope
from api.errors import Problem
from api.events.apply import apply_event
from api.events.locked_run import LockedRun
from api.events.models import EventState, RunEvent
from api.events.writes import EVENTS, Writes
from api.runs.models import Run
from api.runs.states import RunStatus
from trainer.contract import events as ev

_STATUS_TYPES = ("started", "segment_done", "completed", "failed")
_sqlite_writes = threading.Lock()
Place = tuple[int, int, int]  # (segment, attempt, seq)
# The ids stored before (by any run) and the places this run has taken in a seq range of one
# segment and attempt; built once per dialect (building it per post cost about as much as
# running it). The ids are ONE parameter, a JSON array that SQLite's json_each reads or a
# PostgreSQL array: an expanding IN (...) of them was rendered and compiled again for every
# post (a tenth of a single post's CPU, py-spy on the server).
# Segment and attempt are matched as equal so that the range is a seek in the unique index
# (run, segment, attempt, seq): with the run alone, SQLite read every event the run had stored,
# 0.5 ms a post at 5,000 events and growing with the log.
_IDS_MATCH = {
    # JSON-typed: the engine's own JSON serializer writes the list (api/db.py).
    "sqlite": EVENTS.c.id.in_(
        sa_select(column("value")).select_from(func.json_each(bindparam("ids", type_=JSON)))
    ),
    "postgresql": EVENTS.c.id == any_(bindparam("ids", type_=ARRAY(String))),
}
_STORED_OR_TAKEN = {
    dialect: sa_select(
        *(EVENTS.c[c] for c in ("id", "run_id", "segment", "attempt", "seq", "state", "outcome"))
    ).where(
        or_(
            ids_match,
            and_(
                EVENTS.c.run_id == bindparam("run"),
                EVENTS.c.segment == bindparam("segment"),
                EVENTS.c.attempt == bindparam("attempt"),
                EVENTS.c.seq.between(bindparam("lo"), bindparam("hi")),
            ),
        )
    )
    for dialect, ids_match in _IDS_MATCH.items()
}


@dataclass(frozen=True)
class IngestResult:
    event_id: str
    duplicate: bool  # True: this id was stored before; nothing was applied again
    outcome: str
    run_status: RunStatus
    state: EventState = EventState.applied


@dataclass(frozen=True)
class BatchOutcome:
    run_status: RunStatus  # after the whole batch
    results: list[IngestResult | Problem]  # one per event, in order


def ingest(session: Session, run_id: str, event: ev.Event) -> IngestResult:
    """Store `event` for run `run_id` (once) and apply it. Commits. Raises Problem 404 for an
    unknown run, 422 when the event names another run, 409 when its id belongs to another run
    or its place (segment, attempt, seq) holds another event."""
    (result,) = ingest_batch(session, run_id, [event]).results
    if isinstance(result, Problem):
        raise result
    return result


def ingest_with(engine: Engine, run_id: str, events: Sequence[ev.Event]) -> BatchOutcome:
    """`ingest_batch` in a session of its own: the callback route does a request's database
    work in one worker thread this way (api/events/routes.py says why)."""
    with session_scope(engine) as session:
        return ingest_batch(session, run_id, events)


def ingest_batch(session: Session, run_id: str, events: Sequence[ev.Event]) -> BatchOutcome:
    """Store and apply `events` in order, in one transaction; one result per event: what it did,
    or the Problem (409, 422) that refused it alone. Raises Problem 404 for an unknown run."""
    for _ in range(2):
        try:
            with _write_turn(session):
                run, results = _ingest_locked(session, run_id, events)
                status = run.status
                session.commit()
            return BatchOutcome(status, results)
        except IntegrityError:
            # Only another run's concurrent insert of one of these ids gets here (this run's
            # events are serialized by its lock): the second pass finds that id and refuses it.
            session.rollback()
    raise Problem(409, "Event id already used", "an event id of this batch is another run's")


@contextmanager
def _write_turn(session: Session) -> Iterator[None]:
    sqlite = session.get_bind().dialect.name == "sqlite"
    with _sqlite_writes if sqlite else nullcontext():
        try:
            yield
        finally:
            session.rollback()  # a no-op after the commit; releases the lock on any error


@dataclass(frozen=True)
class _Stored:
    """What an already stored event answers a repeat of its id with."""

    run_id: str
    state: str
    outcome: str


def _ingest_locked(
    session: Session, run_id: str, events: Sequence[ev.Event]
) -> tuple[LockedRun, list[IngestResult | Problem]]:
    run = LockedRun.lock(session, run_id)
    stored, taken = _stored_and_taken(session, run_id, events)
    writes = Writes(run_id)
    results = [_ingest_one(session, run, event, stored, taken, writes) for event in events]
    writes.flush(session, run)
    return run, results


def _stored_and_taken(
    session: Session, run_id: str, events: Sequence[ev.Event]
) -> tuple[dict[str, _Stored], dict[Place, str]]:
    """The events' ids stored before (by any run), and the places of this run that the events'
    places may collide with. One query for each (segment, attempt) of the events, which is one
    for nearly every batch: a batch of 1,000 progress events is then five statements and one
    commit. (A seq range, not a list of places: a batch's seqs are contiguous, and 3,000 bound
    parameters cost more than the rows the range may add.)"""
    stored: dict[str, _Stored] = {}
    taken: dict[Place, str] = {}
    groups: dict[tuple[int, int], list[ev.Event]] = {}
    for event in events:
        groups.setdefault((event.segment, event.attempt), []).append(event)
    conn = session.connection()
    query = _STORED_OR_TAKEN[conn.dialect.name]
    for (segment, attempt), group in groups.items():
        seqs = [e.seq for e in group]
        params = {"ids": list({e.id for e in group}), "run": run_id, "lo": min(seqs)}
        params |= {"hi": max(seqs), "segment": segment, "attempt": attempt}
        for event_id, owner, seg, att, seq, state, outcome in conn.execute(query, params):
            stored[event_id] = _Stored(owner, state, outcome)
            if owner == run_id:
                taken[(seg, att, seq)] = event_id
    return stored, taken


def _ingest_one(
    session: Session,
    run: LockedRun,
    event: ev.Event,
    stored: dict[str, _Stored],
    taken: dict[Place, str],
    writes: Writes,
) -> IngestResult | Problem:
    if event.run_id != run.id:
        return Problem(
            422,
            "Event for another run",
            f"the event's run_id {event.run_id!r} does not match the run in the URL {run.id!r}",
        )
    existing = stored.get(event.id)
    if existing is not None:
        if existing.run_id != run.id:
            return Problem(
                409,
                "Event id already used",
                f"event id {event.id!r} belongs to another run; every event needs a unique id",
            )
        return IngestResult(
            event.id, True, existing.outcome, run.status, EventState(existing.state)
        )
    place = (event.segment, event.attempt, event.seq)
    holder = taken.get(place)
    if holder is not None:
        return Problem(
            409,
            "Sequence number already used",
            f"segment {event.segment}, attempt {event.attempt}, seq {event.seq} of this run "
            f"holds event {holder!r} already; a new event needs a new seq",
        )
    # The serializer itself, not `model_dump`: half the cost, the same dict (the profile).
    data = event.data.__pydantic_serializer__.to_python(event.data, mode="json")
    state, outcome = apply_event(session, run, event, writes, data)
    outcome = outcome[:500]
    writes.events.append(
        {
            "id": event.id,
            "run_id": run.id,
            "seq": event.seq,
            "segment": event.segment,
            "attempt": event.attempt,
            "type": event.type,
            "time": event.time,
            "received_at": writes.received_at,
            "data": data,
            "state": state.value,
            "outcome": outcome,
        }
    )
    stored[event.id], taken[place] = _Stored(run.id, state.value, outcome), event.id
    return IngestResult(event.id, False, outcome, run.status, state)


def replay_deferred(session: Session, run: Run) -> list[str]:
    """Apply again, in order, the status events of the run's current segment that arrived
    before the run could take them. The caller holds the run's lock and commits."""
    rows = session.exec(
        select(RunEvent)
        .where(
            RunEvent.run_id == run.id,
            RunEvent.segment == run.segment,
            col(RunEvent.type).in_(_STATUS_TYPES),
            col(RunEvent.state) == EventState.deferred,
        )
        .order_by(col(RunEvent.seq), col(RunEvent.received_at))
    ).all()
    outcomes = []
    writes = Writes(run.id)  # status events only: nothing is collected, nothing to write
    locked = LockedRun.of(session, run)
    for row in rows:
        event = ev.EVENT_ADAPTER.validate_python(
            {
                "id": row.id,
                "run_id": row.run_id,
                "seq": row.seq,
                "segment": row.segment,
                "attempt": row.attempt,
                "type": row.type,
                "time": row.time,
                "data": row.data,
            }
        )
        row.state, outcome = apply_event(session, locked, event, writes, row.data)
        row.outcome = ("replayed: " + outcome)[:500]
        session.add(row)
        outcomes.append(row.outcome)
    return outcomes
