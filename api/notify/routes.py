"""`GET /api/v1/runs/{id}/deliveries`: the webhook posts a run's end caused, with every
attempt's outcome (api/notify/service.py), so a missing notification can be explained."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from api.deps import SessionDep
from api.errors import Problem, problem_responses
from api.notify.models import WebhookDeliveryPublic
from api.notify.service import deliveries_of
from api.runs.models import Run

router = APIRouter(prefix="/runs", tags=["templates"])

RunId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,40}$", description="a run's id")]


@router.get(
    "/{run_id}/deliveries",
    response_model=list[WebhookDeliveryPublic],
    summary="Webhook deliveries of a run's end",
    responses=problem_responses(404, 422),
)
def list_deliveries(run_id: RunId, session: SessionDep) -> list[WebhookDeliveryPublic]:
    if session.get(Run, run_id) is None:
        raise Problem(404, "Run not found", f"there is no run with id {run_id!r}")
    return [
        WebhookDeliveryPublic.model_validate(d, from_attributes=True)
        for d in deliveries_of(session, run_id)
    ]
