"""FastAPI dependencies. Routes get settings, the engine and a database session only from here.

Asking for the engine (and so for a session) takes one of the app's request slots first, and
keeps it until the response is sent: at most `TUNEPLANE_DB_POOL_SIZE` requests touch the
database at once, and the pool has a connection for each (api/db.py says why this is what
keeps concurrent requests from deadlocking on the pool and the worker threads). A request
waiting for a slot waits on the event loop, holding no thread and no connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Concatenate, ParamSpec, TypeVar

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Engine
from sqlmodel import Session

from api.config import Settings
from api.db import RequestSlots, SlotsBusy, session_scope
from api.errors import Problem

# Seconds a client is asked to wait after a 503 for busy slots: requests take milliseconds,
# so a queue that stayed full for `db_wait_seconds` is an overload worth backing off from.
BUSY_RETRY_AFTER = 2
P = ParamSpec("P")
T = TypeVar("T")


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


# `async def`, as every cheap dependency here: a plain `def` one costs a worker-thread hop per
# request (two of the callback route's three hops were this and a sync `authorize`).
async def _settings(request: Request) -> Settings:
    return get_settings(request)


@asynccontextmanager
async def _slot(request: Request) -> AsyncIterator[None]:
    # One slot a request at a time, however many of its dependencies ask: a dashboard page's
    # `dashboard_access` holds one until the response is sent, and its session asks again.
    # Taking a second would deadlock: with more concurrent requests than slots, every slot is
    # held by a request waiting for its second (measured: 32 callback clients on 10 slots, all
    # 503 after the 30 s wait, when `authorize` still held one for every /api/v1 request).
    if getattr(request.state, "db_slot", False):
        yield
        return
    slots: RequestSlots = request.app.state.request_slots
    try:
        await slots.acquire()
    except SlotsBusy as exc:
        raise Problem(
            503,
            "Server busy",
            f"{exc}; try again after {BUSY_RETRY_AFTER} s",
            headers={"Retry-After": str(BUSY_RETRY_AFTER)},
        ) from None
    request.state.db_slot = True
    try:
        yield
    finally:
        request.state.db_slot = False
        slots.release()


async def database_slot(request: Request) -> AsyncIterator[None]:
    async with _slot(request):
        yield


async def in_database_thread(
    request: Request, fn: Callable[Concatenate[Engine, P], T], *args: P.args, **kw: P.kwargs
) -> T:
    """`fn(engine, *args)` on a worker thread, holding a request slot only while it runs: for
    async routes whose cheap checks come first (the trainer's callbacks: the credential and the
    body), so that a slow or unauthenticated client holds no slot while it sends."""
    async with _slot(request):
        return await run_in_threadpool(fn, request.app.state.engine, *args, **kw)


async def get_engine(request: Request, _slot: Annotated[None, Depends(database_slot)]) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_session(engine: Annotated[Engine, Depends(get_engine)]) -> Iterator[Session]:
    # No commit here: services commit their own unit of work (api/db.py says why).
    with session_scope(engine) as session:
        yield session


SettingsDep = Annotated[Settings, Depends(_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
SessionDep = Annotated[Session, Depends(get_session)]
