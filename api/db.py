"""Engine, sessions, migrations, the row lock, and the column types every table uses.

Where commits happen (the one rule): the service functions (`api/<domain>/service.py` and the
other modules beside it that write) commit their own unit of work; routes, models and the
dispatch worker's loop never call `commit()` themselves.
Routes get a session only through `api.deps.SessionDep`; background loops open one with
`session_scope(engine)`. A session is closed (and anything uncommitted rolled back) when either
ends.

Connections and threads (why `RequestSlots` exists): a sync endpoint runs on one of anyio's 40
worker threads, its response is validated on another hop of that pool, and its session is closed
in a third. A request that holds a pooled connection can therefore wait for a thread, while the
threads wait for a connection: with more concurrent requests than connections plus threads
nothing moved until the pool's 30 s timeout answered 500s (200 concurrent creations on SQLite:
35 x 500 after 60 s). So a request takes a *slot* before it may touch the database (`api.deps`:
asking for the engine or a session takes one, for the request's whole life) and the pool holds
a connection for every slot plus `BACKGROUND_CONNECTIONS` for the worker's threads; a request
without a slot waits on the event loop holding neither, and one that waits longer than
`db_wait_seconds` gets a 503 with Retry-After. Each request uses at most one connection at a
time (its session; an auth check's own short session closes before the endpoint runs).
"""

from __future__ import annotations

import asyncio
import json
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from pydantic_core import PydanticSerializationError, to_json
from sqlalchemy import DateTime, Engine, bindparam, create_engine, event, inspect, update
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.types import TypeDecorator
from sqlmodel import Session, SQLModel

MIGRATIONS = Path(__file__).parent / "migrations"
Row = TypeVar("Row", bound=SQLModel)
# Connections beyond the request slots, for the threads that open sessions of their own: the
# dispatch worker, the notifier, and a spare for a scrape or a CLI command sharing the engine.
BACKGROUND_CONNECTIONS = 4
DEFAULT_REQUEST_SLOTS = 10


class SlotsBusy(Exception):
    """No request slot came free within the wait (the api answers 503 with Retry-After)."""

    def __init__(self, size: int, waited: float) -> None:
        super().__init__(f"all {size} database slots stayed busy for {waited:g} s")
        self.size, self.waited = size, waited


class RequestSlots:
    """At most `size` requests use the database at once (the module's docstring says why).
    A waiting request holds no thread and no connection; after `wait_seconds` it gives up."""

    def __init__(self, size: int, wait_seconds: float) -> None:
        self.size, self.wait_seconds = size, wait_seconds
        # One semaphore per event loop: asyncio's primitives belong to the loop that first
        # waits on them, and tests run one app in several loops (one per TestClient).
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]
        self._by_loop = weakref.WeakKeyDictionary()

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        semaphore = self._by_loop.get(loop)
        if semaphore is None:
            semaphore = self._by_loop[loop] = asyncio.Semaphore(self.size)
        return semaphore

    async def acquire(self) -> None:
        """Take a slot, waiting at most `wait_seconds` (then SlotsBusy)."""
        semaphore = self._semaphore()
        if not semaphore.locked():  # a free slot: taken at once, without arming a timeout
            await semaphore.acquire()
            return
        try:
            async with asyncio.timeout(self.wait_seconds):
                await semaphore.acquire()
        except TimeoutError:
            raise SlotsBusy(self.size, self.wait_seconds) from None

    def release(self) -> None:
        self._semaphore().release()


def _to_json(value: Any) -> str:
    """JSON columns' serializer: pydantic-core's, in Rust, where SQLAlchemy's default is
    `json.dumps` (a batch of 1,000 events writes 1,000 `data` values; `json.dumps` was a tenth of
    its time). The same JSON for what the columns hold (NaN stays NaN, keys become strings).
    A string UTF-8 cannot hold (a lone surrogate, as `surrogateescape` makes of a file name's
    undecodable bytes) is `json.dumps`'s to write, escaped, as before."""
    try:
        return to_json(value).decode()
    except PydanticSerializationError:
        return json.dumps(value)


def make_engine(url: str, request_slots: int = DEFAULT_REQUEST_SLOTS) -> Engine:
    """The engine for `url`, its pool sized for `request_slots` concurrent requests plus the
    background threads, with no overflow: a checkout never waits while slots are respected."""
    pool = {"pool_size": request_slots + BACKGROUND_CONNECTIONS, "max_overflow": 0}
    if url.startswith("sqlite"):
        path = make_url(url).database  # none for `sqlite://`, SQLite's in-memory database too
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        else:
            pool = {}  # one in-memory database per connection: SQLAlchemy's own pool for it
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            json_serializer=_to_json,
            **pool,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn: Any, _record: Any) -> None:
            # WAL lets the dashboard read while the worker writes; foreign keys are off by default.
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # Under WAL, NORMAL syncs at checkpoints instead of at every commit: a commit can be
            # lost only to a power cut or an OS crash, never to the api crashing (SQLite's
            # documentation); the callback endpoint's commit per event no longer waits on disk.
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return create_engine(url, pool_pre_ping=True, json_serializer=_to_json, **pool)


def _alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to the newest migration, or to `revision` (a no-op when it is there)."""
    command.upgrade(_alembic_config(engine), revision)


def migration_state(engine: Engine) -> tuple[str | None, str | None]:
    """(revision the database is at, newest revision the code knows)."""
    head = ScriptDirectory.from_config(_alembic_config(engine)).get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    return current, head


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:
        yield session


def lock_row(session: Session, model: type[Row], key: Any) -> Row | None:
    """The row of `model` with primary key `key`, read fresh and locked against concurrent
    writers until the caller commits (None if there is none). PostgreSQL takes a row lock
    (FOR UPDATE). SQLite ignores FOR UPDATE, so a no-op UPDATE of the row's `updated_at` takes
    the database's write lock first, and the row read after it cannot go stale."""
    if session.get_bind().dialect.name == "sqlite":
        session.connection().execute(_touch(model), {"key": key})
    return session.get(model, key, populate_existing=True, with_for_update=True)


@cache
def _touch(model: type[SQLModel]) -> Any:
    """`lock_row`'s no-op UPDATE of a row, built once a table, on the table rather than the
    model: the ORM's bulk UPDATE path and the building cost more than the statement."""
    table: Any = model.__table__  # type: ignore[attr-defined]
    pk = inspect(model).primary_key[0]
    return update(table).where(pk == bindparam("key")).values(updated_at=table.c.updated_at)


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    # Short, URL-safe, unguessable enough for ids that also appear in bucket paths.
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out. SQLite has no time zones and hands back naive values;
    without this, comparing a stored time with `utcnow()` raises on SQLite only."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def bind_processor(self, dialect: Dialect) -> Any:
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)
        to_naive = self.process_bind_param

        # The string SQLAlchemy's SQLite DATETIME stores ("2026-12-03 15:04:05.000123"), made by
        # `isoformat` in C rather than by its %-format of seven fields: a batch of events binds
        # three times a row, and that format was the largest per-row cost of the INSERTs.
        def process(value: datetime | None) -> str | None:
            if value is not None and value.tzinfo is UTC:  # nearly every value: one C call
                return value.isoformat(" ", "microseconds")[:-6]  # without "+00:00"
            naive = to_naive(value, dialect)
            return None if naive is None else naive.isoformat(" ", "microseconds")

        return process

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
