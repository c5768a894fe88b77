"""`GET /api/v1/runs/{id}/artifacts`: where a run's outputs are, with a signed download URL for
each file where the api's credentials can sign one (api/runs/artifacts.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import BaseModel, Field
from sqlmodel import col, select

from api.deps import SessionDep, SettingsDep
from api.errors import Problem, problem_responses
from api.events.models import RunEvent
from api.runs.artifacts import download_url
from api.runs.models import Run

router = APIRouter(prefix="/runs", tags=["runs"])

RunId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,40}$", description="a run's id")]
# Artifacts that are one file (the others, adapter and processor, are directories).
FILE_KINDS = frozenset({"results", "log"})


class ArtifactOut(BaseModel):
    kind: str
    uri: str
    download_url: str | None = Field(
        description="a time-limited signed URL (files in Cloud Storage, when the api's "
        "credentials can sign); null otherwise"
    )


class RunArtifacts(BaseModel):
    run_id: str
    artifact_uri: str | None = Field(description="the run's output prefix (gs://... or a path)")
    artifacts: list[ArtifactOut]


@router.get(
    "/{run_id}/artifacts",
    response_model=RunArtifacts,
    summary="A run's artifacts: URIs and, where possible, signed download URLs",
    responses=problem_responses(404, 422),
)
def get_artifacts(run_id: RunId, session: SessionDep, settings: SettingsDep) -> RunArtifacts:
    run = session.get(Run, run_id)
    if run is None:
        raise Problem(404, "Run not found", f"there is no run with id {run_id!r}")
    rows = session.exec(
        select(RunEvent)
        .where(RunEvent.run_id == run_id, RunEvent.type == "artifact")
        .order_by(col(RunEvent.time))
    ).all()
    latest: dict[str, str] = {}
    for row in rows:  # a later segment's or attempt's report wins
        latest[str(row.data["kind"])] = str(row.data["uri"])
    return RunArtifacts(
        run_id=run_id,
        artifact_uri=run.artifact_uri,
        artifacts=[
            ArtifactOut(
                kind=kind,
                uri=uri,
                download_url=download_url(uri, settings) if kind in FILE_KINDS else None,
            )
            for kind, uri in sorted(latest.items())
        ],
    )
