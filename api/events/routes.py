"""The trainer's callback endpoints and the metrics they feed.

`POST /api/v1/runs/{id}/events` takes one event (trainer/contract/events.py), `POST
/api/v1/runs/{id}/events:batch` a backlog of them (`{"events": [...]}`, in order, at most
MAX_BATCH_EVENTS and MAX_EVENT_BYTES), both authenticated by the run's own token
(api/auth/callback.py; API tokens are not accepted here, see api/auth/access.py). The order of
checks is deliberate: the credential first (so nobody without one learns whether a run exists or
makes us read a large body), then the body's size, then its content, then the run.
A single post answers 201 when the event was stored, 200 when its id had been stored before (the
reporter retries, so a repeat is normal), 409 when its place (segment, attempt, seq) holds
another event; either way the body says what applying it did. A batch answers 200 with one
receipt per event, each with the status a single post would have had. A 503 with Retry-After
means "not now" (an ID token that cannot be checked yet, api/auth/oidc.py): the trainer retries
it, where any other 4xx drops the event.

Lean on purpose (a trainer may report every step, and a sweep runs hundreds): the route is async,
so the credential and the body are checked on the event loop, and all of a request's database
work runs in one worker thread (`service.ingest_with` opens its own session there) rather than a
hop per dependency.
"""

from __future__ import annotations

from typing import Annotated, Any, get_args

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError
from pydantic_core import from_json, to_json

from api.auth.oidc import require_callback_credential
from api.deps import SessionDep, in_database_thread
from api.errors import Problem, problem_responses
from api.events import service
from api.events.metrics import RunMetrics, run_metrics
from api.events.models import EventState
from api.runs.states import RunStatus
from trainer.contract import events as ev
from trainer.contract.events import MAX_BATCH_EVENTS, MAX_EVENT_BYTES

router = APIRouter(prefix="/runs", tags=["callbacks"])

RunId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,40}$", description="a run's id")]
_EVENT_TYPES = frozenset(get_args(ev.EventType))
# Parsing a large body (an evaluation with every prediction) would hold up the event loop.
_PARSE_IN_THREAD_BYTES = 64 * 1024


class EventReceipt(BaseModel):
    id: str
    duplicate: bool = Field(description="true when this event id had been stored before")
    state: EventState = Field(description="applied, recorded, deferred or rejected")
    outcome: str = Field(description="what applying the event did, or why it changed nothing")
    run_status: RunStatus


class BatchReceipt(BaseModel):
    index: int = Field(description="the event's place in the batch")
    id: str | None = Field(description="the event's id (none when it could not be read)")
    status: int = Field(description="what a single post would have answered: 201, 200, 409, 422")
    duplicate: bool
    state: EventState | None = Field(description="what applying it did; none when refused")
    outcome: str = Field(description="what applying it did, or why it was refused")
    errors: list[dict[str, str]] | None = None


class BatchReceipts(BaseModel):
    run_status: RunStatus = Field(description="the run's status after the whole batch")
    stored: int = Field(description="events stored by this batch")
    duplicates: int = Field(description="events whose id had been stored before")
    refused: int = Field(description="events refused (409, 422); retrying cannot change that")
    receipts: list[BatchReceipt]


def _too_large(size: int | None = None) -> Problem:
    got = f" (got {size} bytes)" if size is not None else ""
    return Problem(
        413,
        "Event too large",
        f"a request may carry at most {MAX_EVENT_BYTES} bytes{got}; send fewer predictions"
        " (or fewer events in a batch)",
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


def _field_errors(exc: ValidationError, prefix: str = "") -> list[dict[str, str]]:
    """Each error's field as the event names it (`data.loss`), without the union's tag."""
    out = []
    for err in exc.errors(include_url=False)[:50]:
        loc = list(err["loc"])
        if loc and loc[0] in _EVENT_TYPES:
            loc = loc[1:]
        field = ".".join(str(p) for p in loc) or "(body)"
        out.append({"field": prefix + field, "message": err["msg"].removeprefix("Value error, ")})
    return out


def _invalid(errors: list[dict[str, str]]) -> Problem:
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    return Problem(422, "Invalid event", detail, errors=errors)


def _parse_one(body: bytes) -> ev.Event:
    try:
        return ev.parse_event(body)
    except ValidationError as exc:
        raise _invalid(_field_errors(exc)) from None


async def _in_thread_if_large(size: int, fn: Any, *args: Any) -> Any:
    return await run_in_threadpool(fn, *args) if size > _PARSE_IN_THREAD_BYTES else fn(*args)


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
async def post_event(
    run_id: RunId, body: Annotated[bytes, Depends(_event_body)], request: Request
) -> Response:
    event = await _in_thread_if_large(len(body), _parse_one, body)
    outcome = await in_database_thread(request, service.ingest_with, run_id, [event])
    (result,) = outcome.results
    if isinstance(result, Problem):
        raise result
    receipt = EventReceipt(
        id=result.event_id,
        duplicate=result.duplicate,
        state=result.state,
        outcome=result.outcome,
        run_status=result.run_status,
    )
    return Response(
        receipt.model_dump_json(),
        status_code=200 if result.duplicate else 201,
        media_type="application/json",
    )


# Receipts are plain dicts in BatchReceipt's shape: a pydantic object per event and its dump
# were half the CPU a 1,000-event batch took (the profile); BatchReceipts documents the shape.
Receipt = dict[str, Any]


def _parse_batch(body: bytes) -> tuple[list[ev.Event], dict[int, Receipt], int]:
    """The batch's valid events in order, a receipt for each invalid one (by its index), and
    the number of events. Raises a 422 Problem when the body is not a batch at all."""
    try:  # the common case, every event valid: one pass of pydantic's JSON parser
        valid = ev.EventBatch.model_validate_json(body).events
        return valid, {}, len(valid)
    except ValidationError:
        pass  # find out which events are not valid, and why
    try:
        # pydantic-core's parser, as the first pass's: `json.loads` takes a lone surrogate
        # ("\ud800") that no UTF-8 answer or row can hold (a 500 once); this one refuses it.
        document = from_json(body)
    except ValueError as exc:
        raise _invalid([{"field": "(body)", "message": f"not JSON: {exc}"}]) from None
    items = document.get("events") if isinstance(document, dict) else None
    if not isinstance(items, list) or set(document) != {"events"}:
        raise _invalid([{"field": "(body)", "message": 'must be {"events": [event, ...]}'}])
    if len(items) > MAX_BATCH_EVENTS:
        message = f"at most {MAX_BATCH_EVENTS} events a batch (got {len(items)}); send several"
        raise _invalid([{"field": "events", "message": message}])
    events: list[ev.Event] = []
    refused: dict[int, Receipt] = {}
    for i, item in enumerate(items):
        try:
            events.append(ev.EVENT_ADAPTER.validate_python(item))
        except ValidationError as exc:
            errors = _field_errors(exc)
            raw_id = item.get("id") if isinstance(item, dict) else None
            refused[i] = _refusal(
                i,
                raw_id if isinstance(raw_id, str) else None,
                422,
                "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5]),
                errors,
            )
    return events, refused, len(items)


def _refusal(
    index: int, event_id: str | None, status: int, why: str, errors: Any = None
) -> Receipt:
    return {
        "index": index,
        "id": event_id,
        "status": status,
        "duplicate": False,
        "state": None,
        "outcome": why,
        "errors": errors,
    }


def _receipt(index: int, event: ev.Event, result: service.IngestResult | Problem) -> Receipt:
    if isinstance(result, Problem):
        return _refusal(index, event.id, result.status, result.detail or result.title)
    return {
        "index": index,
        "id": result.event_id,
        "status": 200 if result.duplicate else 201,
        "duplicate": result.duplicate,
        "state": result.state.value,
        "outcome": result.outcome,
        "errors": None,
    }


@router.post(
    "/{run_id}/events:batch",
    response_model=BatchReceipts,
    summary="A trainer reports several events of its run at once, in order (per-run token)",
    responses=problem_responses(400, 401, 403, 404, 413, 422, 503),
)
async def post_events(
    run_id: RunId, body: Annotated[bytes, Depends(_event_body)], request: Request
) -> Response:
    events, receipts, total = await _in_thread_if_large(len(body), _parse_batch, body)
    outcome = await in_database_thread(request, service.ingest_with, run_id, events)
    applied = iter(zip(events, outcome.results, strict=True))
    ordered = [receipts.get(i) or _receipt(i, *next(applied)) for i in range(total)]
    statuses = [r["status"] for r in ordered]
    answer = {
        "run_status": outcome.run_status.value,
        "stored": statuses.count(201),
        "duplicates": statuses.count(200),
        "refused": sum(s >= 400 for s in statuses),
        "receipts": ordered,
    }
    # A thousand receipts: pydantic-core writes them in Rust, a fifth of `json.dumps`'s time.
    return Response(to_json(answer), media_type="application/json")


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
