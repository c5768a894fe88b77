"""The runs resource under /api/v1/runs. Thin: parse, call api.runs.service, shape the response.

Creating POSTs (create, retrain) answer 201 with `Location` when they make a run, and 200 with the
same body and `Location` when an `Idempotency-Key` replays an earlier request (the header
`Idempotent-Replayed: true` says so). `POST /runs/{id}/events` is the trainer's callback and
lives in api/events/routes.py.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Path, Query, Response

from api.deps import SessionDep, SettingsDep
from api.errors import problem_responses, require_json
from api.events import query as events_query
from api.events.models import RunEventPublic
from api.runs import query, service
from api.runs.idempotency import KEY_PATTERN
from api.runs.models import TAG, RetrainRequest, RunCreate, RunPublic, RunsPage
from api.runs.states import RunStatus

# Bodies over 256 KiB are refused with 413 by api.errors.BodyLimit.
router = APIRouter(prefix="/runs", tags=["runs"])

RunId = Annotated[
    str,
    Path(pattern=r"^[A-Za-z0-9_-]{1,40}$", description="a run's id, e.g. run_0123abcd..."),
]
IdempotencyKey = Annotated[
    str | None,
    Header(
        pattern=KEY_PATTERN,
        description="repeat a creating POST safely: the same key and body give the same run "
        "(200, `Idempotent-Replayed: true`); the same key with another body is a 409",
    ),
]
_LOCATION = {"Location": {"description": "the run's URL", "schema": {"type": "string"}}}
_CREATED: dict[int | str, dict[str, Any]] = {
    201: {"description": "run created", "headers": _LOCATION},
    200: {
        "description": "an earlier request with this Idempotency-Key created the run",
        "model": RunPublic,
        "headers": {
            **_LOCATION,
            "Idempotent-Replayed": {
                "description": "`true`: this answer replays an earlier request",
                "schema": {"type": "string", "enum": ["true"]},
            },
        },
    },
}


_CREATE_EXAMPLES = {
    "gemma-3-4b-pets": {
        "summary": "QLoRA of Gemma 3 4B on Oxford-IIIT Pet",
        "value": {
            "spec": {
                "model_id": "google/gemma-3-4b-it",
                "dataset": "oxford-iiit-pet",
                "train_size": 1000,
                "eval_size": 500,
                "gpu_type": "nvidia-l4",
            },
            "name": "pets-4b",
            "tags": ["pets", "baseline"],
        },
    },
    "digits": {
        "summary": "A small offline run on scikit-learn's digits",
        "value": {"spec": {"model_id": "google/gemma-3-4b-it", "dataset": "digits"}},
    },
}
_RETRAIN_EXAMPLES = {
    "more-data": {
        "summary": "The same run with more training samples",
        "value": {"overrides": {"train_size": 2500}, "tags": ["retrain"]},
    }
}


def _created(response: Response, result: service.Created) -> RunPublic:
    response.headers["Location"] = f"/api/v1/runs/{result.run.id}"
    if not result.created:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return result.run


@router.post(
    "",
    status_code=201,
    response_model=RunPublic,
    summary="Submit a run",
    dependencies=[Depends(require_json)],
    responses={**_CREATED, **problem_responses(409, 413, 415, 422)},
)
def create_run(
    data: Annotated[RunCreate, Body(openapi_examples=_CREATE_EXAMPLES)],
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> RunPublic:
    """Validate the spec, estimate GPU memory, time and cost, and queue the run. A spec that
    cannot fit its GPU is refused (422) with the estimate's breakdown."""
    result = service.create_run(session, settings, data, idempotency_key=idempotency_key)
    return _created(response, result)


@router.get("", response_model=RunsPage, summary="List runs", responses=problem_responses(422))
def list_runs(
    session: SessionDep,
    status: Annotated[list[RunStatus] | None, Query(description="any of these")] = None,
    model: Annotated[
        str | None, Query(max_length=300, pattern=r"^[^\x00]*$", description="exact model id")
    ] = None,
    tag: Annotated[
        list[Annotated[str, Query(pattern=TAG.pattern)]] | None,
        Query(description="runs with all of these tags"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=query.MAX_PAGE_SIZE)] = query.PAGE_SIZE,
    cursor: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the previous page")
    ] = None,
) -> RunsPage:
    """Newest first; `next_cursor` pages on, stable while runs are being added."""
    return query.list_runs(
        session, status=status or (), model=model, tags=tag or (), limit=limit, cursor=cursor
    )


@router.get(
    "/{run_id}",
    response_model=RunPublic,
    summary="Get a run",
    responses=problem_responses(404, 422),
)
def get_run(run_id: RunId, session: SessionDep) -> RunPublic:
    return query.get_run(session, run_id)


@router.post(
    "/{run_id}/cancel",
    response_model=RunPublic,
    summary="Cancel a run",
    responses=problem_responses(404, 409, 422),
)
def cancel_run(run_id: RunId, session: SessionDep, settings: SettingsDep) -> RunPublic:
    """A queued run is cancelled at once; a dispatched or running one becomes `cancelling` until
    its execution is stopped. Cancelling a finished run is a 409."""
    return service.cancel_run(session, settings, run_id)


@router.post(
    "/{run_id}/retrain",
    status_code=201,
    response_model=RunPublic,
    summary="Retrain: a new run from this run's spec",
    dependencies=[Depends(require_json)],
    responses={**_CREATED, **problem_responses(404, 409, 413, 415, 422)},
)
def retrain_run(
    run_id: RunId,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
    request: Annotated[RetrainRequest | None, Body(openapi_examples=_RETRAIN_EXAMPLES)] = None,
    idempotency_key: IdempotencyKey = None,
) -> RunPublic:
    """`overrides` replaces single spec fields (validated like a new spec); name, tags and notes
    are the parent's unless given. The new run's `parent_id` is this run."""
    result = service.retrain_run(
        session, settings, run_id, request, idempotency_key=idempotency_key
    )
    return _created(response, result)


@router.get(
    "/{run_id}/events",
    response_model=list[RunEventPublic],
    summary="A run's events",
    responses=problem_responses(404, 422),
)
def list_events(
    run_id: RunId,
    session: SessionDep,
    after_seq: Annotated[
        int, Query(ge=-1, le=2**31 - 1, description="only events with a larger `seq`")
    ] = -1,
    limit: Annotated[int, Query(ge=1, le=events_query.MAX_EVENTS_PAGE)] = 100,
) -> list[RunEventPublic]:
    """Ordered by `seq`, then arrival. Page on with `after_seq` = the last event's `seq`
    (a page never splits events that share a `seq`)."""
    return events_query.list_events(session, run_id, after_seq=after_seq, limit=limit)
