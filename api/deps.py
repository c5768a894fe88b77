"""FastAPI dependencies. Routes get settings, the engine and a database session only from here.

Asking for the engine (and so for a session) takes one of the app's request slots first, and
keeps it until the response is sent: at most `TUNEPLANE_DB_POOL_SIZE` requests touch the
database at once, and the pool has a connection for each (api/db.py says why this is what
keeps concurrent requests from deadlocking on the pool and the worker threads). A request
waiting for a slot waits on the event loop, holding no thread and no connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlmodel import Session

from api.config import Settings
from api.db import RequestSlots, SlotsBusy, session_scope
from api.errors import Problem

# Seconds a client is asked to wait after a 503 for busy slots: requests take milliseconds,
# so a queue that stayed full for `db_wait_seconds` is an overload worth backing off from.
BUSY_RETRY_AFTER = 2


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def database_slot(request: Request) -> AsyncIterator[None]:
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
    try:
        yield
    finally:
        slots.release()


# `async def`: a plain `def` dependency takes a trip through the thread pool.
async def get_engine(request: Request, _slot: Annotated[None, Depends(database_slot)]) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_session(engine: Annotated[Engine, Depends(get_engine)]) -> Iterator[Session]:
    # No commit here: services commit their own unit of work (api/db.py says why).
    with session_scope(engine) as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
SessionDep = Annotated[Session, Depends(get_session)]
