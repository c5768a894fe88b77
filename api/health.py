"""Liveness and readiness probes (Cloud Run, load balancers, `tuneplane demo`).

`/healthz`: the process answers. `/readyz`: the database answers and its schema is at the newest
migration, so a replica never takes traffic against a schema it does not understand."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError

from api.db import migration_state
from api.deps import EngineDep
from api.errors import Problem, problem_responses

log = logging.getLogger("tuneplane.api")
router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    database: str
    migration: str | None


@router.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Ready, summary="Readiness", responses=problem_responses(503))
def readyz(engine: EngineDep) -> Ready:
    try:
        current, head = migration_state(engine)
    except (SQLAlchemyError, OSError) as exc:
        # The driver's message names the host and port (and a path or user): it goes to the
        # log, and the answer, which anyone may read, says only what kind of failure it was.
        log.warning("readiness: the database did not answer: %s", str(exc).splitlines()[0])
        raise Problem(
            503,
            "Database unreachable",
            f"the {engine.dialect.name} database did not answer ({type(exc).__name__}); "
            "the server's log has the details",
            headers={"Retry-After": "5"},
        ) from None
    if current != head:
        raise Problem(
            503,
            "Database schema not current",
            f"the database is at migration {current or 'none'}, this code needs {head}; "
            "`tuneplane serve` migrates on start",
        )
    return Ready(status="ready", database=engine.dialect.name, migration=current)
