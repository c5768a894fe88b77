"""Promoting a run to its template's champion by hand: `POST /api/v1/runs/{id}/promote`.
(Automatic promotion is a template setting, applied when a run ends: api/runs/finish.py.)
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path, Request

from api.auth.access import principal_of
from api.deps import SessionDep
from api.errors import problem_responses, require_json
from api.templates import champions as service
from api.templates.models import ChampionPublic, PromoteRequest

router = APIRouter(prefix="/runs", tags=["templates"])

RunId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,40}$", description="a run's id")]


@router.post(
    "/{run_id}/promote",
    response_model=ChampionPublic,
    summary="Make a run its template's champion",
    dependencies=[Depends(require_json)],
    responses=problem_responses(404, 409, 415, 422),
)
def promote(
    run_id: RunId,
    session: SessionDep,
    request: Request,
    body: Annotated[PromoteRequest | None, Body()] = None,
) -> ChampionPublic:
    """Only a run that succeeded and did not fail its gate (unless `force`, with a `note`)."""
    return service.promote(session, run_id, body or PromoteRequest(), by=principal_of(request).name)
