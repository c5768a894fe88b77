"""The trainer's callback endpoint and the metrics it feeds.

`POST /api/v1/runs/{id}/events` takes one event (trainer/events.py), authenticated by the run's
own token (api/auth/callback.py; API tokens are not accepted here, see api/auth/access.py). The
order of checks is deliberate: the credential first (so nobody without one learns whether a run
exists or makes us read a large body), then the run, then the body's size, then its content.
Answers 201 when the event was stored, 200 when its id had been stored before (the reporter
retries, so a repeat is normal); either way the body says what applying it did. A 503 with
Retry-After means "not now" (an ID token that cannot be checked yet, api/auth/oidc.py): the
trainer retries it, where any other 4xx drops the event.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, Field, ValidationError

from api.auth.oidc import require_callback_credential
from api.deps import SessionDep
from api.errors import Problem, problem_responses
from api.events import service
from api.events.metrics import RunMetrics, run_metrics
from api.events.models import EventState
from api.runs.states import RunStatus
from trainer.contract.events import MAX_EVENT_BYTES, parse_event

router = APIRouter(prefix="/runs", tags=["callbacks"])

RunId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,40}$", description="a run's id")]


class EventReceipt(BaseModel):
    id: str
    duplicate: bool = Field(description="true when this event id had been stored before")
    state: EventState = Field(description="applied, recorded, deferred or rejected")
    outcome: str = Field(description="what applying the event did, or why it changed nothing")
    run_status: RunStatus


def _too_large(size: int | None = None) -> Problem:
    got = f" (got {size} bytes)" if size is not None else ""
    return Problem(
        413,
        "Event too large",
        f"an event may be at most {MAX_EVENT_BYTES} bytes{got}; send fewer predictions",
    )


async def _event_body(
    request: Request,
    # The run's HMAC token, or (CALLBACK_AUTH=oidc) the trainer's Google ID token.
    run_id: Annotated[str, Depends(require_callback_credential)],
) -> bytes:
    """The raw body, read only after the token checked out and never beyond the limit."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Problem(400, "Bad Request", "Content-Length is not a number")
        if int(declared) > MAX_EVENT_BYTES:
            raise _too_large(int(declared))
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_EVENT_BYTES:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


@router.post(
    "/{run_id}/events",
    status_code=201,
    response_model=EventReceipt,
    summary="A trainer reports one event of its run (per-run bearer token)",
    responses={
        200: {"description": "this event id was stored before", "model": EventReceipt},
        **problem_responses(400, 401, 403, 404, 409, 413, 422, 503),
    },
)
def post_event(
    run_id: RunId,
    body: Annotated[bytes, Depends(_event_body)],
    session: SessionDep,
    response: Response,
) -> EventReceipt:
    try:
        event = parse_event(body)
    except ValidationError as exc:
        errors = [
            {
                "field": ".".join(str(p) for p in err["loc"]) or "(body)",
                "message": err["msg"].removeprefix("Value error, "),
            }
            for err in exc.errors(include_url=False)
        ][:50]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        raise Problem(422, "Invalid event", detail, errors=errors) from None
    result = service.ingest(session, run_id, event)
    if result.duplicate:
        response.status_code = 200
    return EventReceipt(
        id=result.event_id,
        duplicate=result.duplicate,
        state=result.state,
        outcome=result.outcome,
        run_status=result.run_status,
    )


@router.get(
    "/{run_id}/metrics",
    response_model=RunMetrics,
    summary="A run's training series, baseline and final evaluations, per-class metrics",
    responses=problem_responses(404, 422),
)
def get_metrics(
    run_id: RunId,
    session: SessionDep,
    since_step: Annotated[
        int, Query(ge=-1, le=2**31 - 1, description="only steps after this one (for pollers)")
    ] = -1,
    predictions: Annotated[
        bool, Query(description="include every evaluation sample's prediction")
    ] = False,
) -> RunMetrics:
    return run_metrics(session, run_id, since_step=since_step, predictions=predictions)
