"""`GET /api/v1/runs/{id}/artifacts`: where a run's outputs are, with a signed download URL for
each file where the api's credentials can sign one (api/runs/artifacts.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from api.deps import SessionDep, SettingsDep
from api.errors import problem_responses
from api.runs.artifacts import RunArtifacts, run_artifacts

router = APIRouter(prefix="/runs", tags=["runs"])

RunId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,40}$", description="a run's id")]


@router.get(
    "/{run_id}/artifacts",
    response_model=RunArtifacts,
    summary="A run's artifacts: URIs and, where possible, signed download URLs",
    responses=problem_responses(404, 422),
)
def get_artifacts(run_id: RunId, session: SessionDep, settings: SettingsDep) -> RunArtifacts:
    return run_artifacts(session, settings, run_id)
