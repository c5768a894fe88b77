"""`GET /api/v1/runs/{id}/deliveries`: the webhook posts a run's end caused, with every
attempt's outcome (api/notify/service.py), so a missing notification can be explained."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from api.deps import SessionDep
from api.errors import problem_responses
from api.notify.models import WebhookDeliveryPublic
from api.notify.service import deliveries_of

router = APIRouter(prefix="/runs", tags=["templates"])

RunId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,40}$", description="a run's id")]


@router.get(
    "/{run_id}/deliveries",
    response_model=list[WebhookDeliveryPublic],
    summary="Webhook deliveries of a run's end",
    responses=problem_responses(404, 422),
)
def list_deliveries(run_id: RunId, session: SessionDep) -> list[WebhookDeliveryPublic]:
    return deliveries_of(session, run_id)
