"""What can be done with runs, independent of HTTP: the JSON routes and the dashboard both call
these. Each function takes a session and plain typed arguments, returns public models (detached
from the session), raises `api.errors.Problem` for anything a person must fix, and commits its
own unit of work (the rule in api/db.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import and_, or_, update
from sqlmodel import Session, col, select

from api.config import Settings
from api.errors import Problem
from api.events.models import RunEvent, RunEventPublic
from api.runs import idempotency, model_check
from api.runs.estimates import estimate, refusal_detail
from api.runs.models import _TAG, RetrainRequest, Run, RunCreate, RunPublic, RunsPage, RunTag
from api.runs.pagination import decode_cursor, encode_cursor
from api.runs.states import TERMINAL, RunStatus
from api.runs.status import set_status
from trainer.contract.spec import RunSpec, describe_errors

DEFAULT_PAGE = 50
MAX_PAGE = 200
MAX_EVENTS_PAGE = 1000

CREATE_SCOPE = "runs.create"
RETRAIN_SCOPE = "runs.retrain"


@dataclass(frozen=True)
class Created:
    run: RunPublic
    created: bool  # False: an earlier request with the same Idempotency-Key made this run

    @property
    def id(self) -> str:
        return self.run.id


# -- reading ------------------------------------------------------------------------------------


def get_run(session: Session, run_id: str) -> RunPublic:
    run = _find(session, run_id)
    return to_public(run, _tags_of(session, [run.id]).get(run.id, []))


def list_runs(
    session: Session,
    *,
    status: Sequence[RunStatus] = (),
    model: str | None = None,
    tags: Sequence[str] = (),
    limit: int = DEFAULT_PAGE,
    cursor: str | None = None,
) -> RunsPage:
    """Newest first. `status`: any of them; `tags`: all of them; `cursor`: a page's
    `next_cursor`. Stable while runs are added (see api/runs/pagination.py)."""
    if not 1 <= limit <= MAX_PAGE:
        raise _invalid("query.limit", f"must be between 1 and {MAX_PAGE} (got {limit})")
    if model is not None:
        _check_text(model, "query.model", max_length=300)
    for tag in tags:
        if not _TAG.match(tag):
            raise _invalid("query.tag", f"{tag!r} is not a tag (letters, digits and _.:/=+-)")
    stmt = select(Run)
    if status:
        stmt = stmt.where(col(Run.status).in_([RunStatus(s).value for s in status]))
    if model is not None:
        stmt = stmt.where(Run.model_id == model)
    for tag in dict.fromkeys(tags):
        tagged = select(RunTag.run_id).where(RunTag.tag == tag)
        stmt = stmt.where(col(Run.id).in_(tagged))
    if cursor:  # an empty cursor is the first page (a shell loop's first `cursor=$NEXT`)
        after_time, after_id = decode_cursor(cursor)
        stmt = stmt.where(
            or_(
                col(Run.created_at) < after_time,
                and_(col(Run.created_at) == after_time, col(Run.id) < after_id),
            )
        )
    stmt = stmt.order_by(col(Run.created_at).desc(), col(Run.id).desc()).limit(limit + 1)
    rows = list(session.exec(stmt))
    page, more = rows[:limit], len(rows) > limit
    tag_map = _tags_of(session, [r.id for r in page])
    return RunsPage(
        items=[to_public(r, tag_map.get(r.id, [])) for r in page],
        next_cursor=encode_cursor(page[-1].created_at, page[-1].id) if more else None,
    )


def list_events(
    session: Session, run_id: str, *, after_seq: int = -1, limit: int = 100
) -> list[RunEventPublic]:
    """A run's events ordered by (seq, received_at), those with `seq > after_seq`. A page never
    splits the events that share one `seq` (a retried task re-numbers its events), so passing
    the last event's `seq` as `after_seq` walks every event exactly once."""
    if not 1 <= limit <= MAX_EVENTS_PAGE:
        raise _invalid("query.limit", f"must be between 1 and {MAX_EVENTS_PAGE} (got {limit})")
    _find(session, run_id)
    order = (col(RunEvent.seq), col(RunEvent.received_at), col(RunEvent.id))
    base = select(RunEvent).where(RunEvent.run_id == run_id)
    rows = list(
        session.exec(base.where(RunEvent.seq > after_seq).order_by(*order).limit(limit + 1))
    )
    if len(rows) > limit:
        cut = rows[limit].seq
        page = [r for r in rows[:limit] if r.seq != cut]
        # One seq with more events than a page: return all of them rather than loop forever.
        rows = page or list(session.exec(base.where(RunEvent.seq == cut).order_by(*order)))
    return [RunEventPublic.model_validate(r, from_attributes=True) for r in rows]


# -- writing ------------------------------------------------------------------------------------


# Every write takes (session, settings, ...), so callers need not know which ones use settings.


def create_run(
    session: Session,
    settings: Settings,
    data: RunCreate,
    *,
    idempotency_key: str | None = None,
) -> Created:
    """Validate, estimate and store a queued run. A spec whose estimate cannot fit its GPU is
    refused (422, with the estimate). A spec that names no GPU gets `settings.default_gpu_type`."""
    if "gpu_type" not in data.spec.model_fields_set:
        spec = RunSpec.model_validate(
            {**data.spec.model_dump(), "gpu_type": settings.default_gpu_type}
        )
        data = data.model_copy(update={"spec": spec})
    check_storable(data.model_dump(mode="json"), "body")
    # The model's own files, where readable: a model the trainer cannot fine-tune is refused
    # now rather than after a GPU was paid for; its config.json sharpens the estimate.
    config = model_check.check(data.spec.model_id, settings.hub_url)
    est = estimate_or_refuse(data.spec, "body.spec", config)

    def insert() -> str:
        return insert_run(session, data.spec, data.name, data.notes, data.tags, None, est)

    outcome = idempotency.create_once(
        session,
        scope=CREATE_SCOPE,
        key=idempotency_key,
        fingerprint=idempotency.request_hash(data),
        create=insert,
    )
    return Created(get_run(session, outcome.resource_id), outcome.created)


def retrain_run(
    session: Session,
    settings: Settings,
    run_id: str,
    request: RetrainRequest | None = None,
    *,
    idempotency_key: str | None = None,
) -> Created:
    """A new queued run from `run_id`'s spec with `request.overrides` applied, linked to it by
    `parent_id`. Name, tags and notes are the parent's unless given."""
    request = request or RetrainRequest()
    parent = _find(session, run_id)
    merged: dict[str, Any] = {**parent.spec, **request.overrides}
    try:
        spec = RunSpec.model_validate(merged)
    except ValidationError as exc:
        errors = describe_errors(exc)
        for err in errors:
            top = err["field"].split(".", 1)[0]
            where = "body.overrides" if top in request.overrides else "stored spec"
            err["field"] = f"{where}.{err['field']}"
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        raise Problem(422, "Invalid overrides", detail, errors=errors) from None
    check_storable(request.model_dump(mode="json"), "body")
    est = estimate_or_refuse(spec, "body.overrides")
    tags = request.tags if request.tags is not None else _tags_of(session, [run_id]).get(run_id, [])
    name = request.name if request.name is not None else parent.name
    notes = request.notes if request.notes is not None else parent.notes

    def insert() -> str:
        return insert_run(session, spec, name, notes, tags, run_id, est)

    outcome = idempotency.create_once(
        session,
        scope=RETRAIN_SCOPE,
        key=idempotency_key,
        fingerprint=idempotency.request_hash(request, parent_id=run_id),
        create=insert,
    )
    return Created(get_run(session, outcome.resource_id), outcome.created)


def cancel_run(
    session: Session, settings: Settings, run_id: str, *, reason: str | None = None
) -> RunPublic:
    """queued → cancelled at once; dispatched or running → cancelling (the worker stops the
    execution and finishes the cancel); cancelling → unchanged; finished → 409."""
    run = lock_run(session, run_id)
    reason = reason or "cancelled by request"
    status = RunStatus(run.status)
    if status in TERMINAL:
        raise Problem(
            409,
            "Run already finished",
            f"run {run.id} is {status.value}; a finished run cannot be cancelled",
            run_status=status.value,
        )
    if status == RunStatus.queued:
        set_status(session, run, RunStatus.cancelled, reason)
    elif status != RunStatus.cancelling:
        set_status(session, run, RunStatus.cancelling, reason)
    session.commit()
    return get_run(session, run_id)


def lock_run(session: Session, run_id: str) -> Run:
    """Load a run for a change of status, locked against concurrent writers until the caller
    commits: a row lock on PostgreSQL; on SQLite a no-op UPDATE takes the database's write lock
    first, so the row read after it cannot go stale (SQLite ignores FOR UPDATE)."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(
            update(Run).where(col(Run.id) == run_id).values(updated_at=col(Run.updated_at))
        )
    run = session.get(Run, run_id, populate_existing=True, with_for_update=True)
    if run is None:
        raise _not_found(run_id)
    return run


# -- helpers ------------------------------------------------------------------------------------


def to_public(run: Run, tags: Iterable[str]) -> RunPublic:
    fields = {name: getattr(run, name) for name in RunPublic.model_fields if name != "tags"}
    return RunPublic.model_validate({**fields, "tags": sorted(tags)})


def _find(session: Session, run_id: str) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise _not_found(run_id)
    return run


def _not_found(run_id: str) -> Problem:
    return Problem(404, "Run not found", f"there is no run with id {run_id!r}")


def _tags_of(session: Session, run_ids: list[str]) -> dict[str, list[str]]:
    if not run_ids:
        return {}
    out: dict[str, list[str]] = {}
    for row in session.exec(select(RunTag).where(col(RunTag.run_id).in_(run_ids))):
        out.setdefault(row.run_id, []).append(row.tag)
    return out


def insert_run(
    session: Session,
    spec: RunSpec,
    name: str,
    notes: str,
    tags: Iterable[str],
    parent_id: str | None,
    est: dict[str, Any],
) -> str:
    """Add a queued run and its tags to `session` (flushed, not committed); its id."""
    run = Run(
        name=name,
        notes=notes,
        spec=spec.model_dump(mode="json"),
        model_id=spec.model_id,
        dataset=spec.dataset,
        gpu_type=spec.gpu_type,
        parent_id=parent_id,
        estimate=est,
    )
    session.add(run)
    session.flush()  # the run row first: run_tags points at it
    for tag in dict.fromkeys(tags):
        session.add(RunTag(run_id=run.id, tag=tag))
    return run.id


def estimate_or_refuse(
    spec: RunSpec, field: str, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The spec's estimate as stored on `Run.estimate`; a 422 problem carrying the estimate
    when it cannot fit its GPU (`field` is where the spec sits in the request)."""
    est = estimate(spec, config)
    if est.fits is False:
        detail = refusal_detail(spec, est)
        memory_fits = est.memory is not None and est.memory.total_gib <= est.memory.gpu_gib
        too_short = memory_fits and any("max_length" in n for n in est.notes)
        culprit = "max_length" if too_short else "gpu_type"
        raise Problem(
            422,
            "Run does not fit the GPU",
            detail,
            estimate=est.model_dump(mode="json"),
            errors=[{"field": f"{field}.{culprit}", "message": detail}],
        )
    return est.model_dump(mode="json")


def check_storable(value: Any, path: str) -> None:
    """Refuse text no database can store: NUL characters (PostgreSQL rejects them) and unpaired
    surrogates (not UTF-8). JSON allows both, so a request can carry them."""
    if isinstance(value, str):
        _check_text(value, path)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(str(k), path)
            check_storable(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_storable(v, f"{path}.{i}")


def _check_text(value: str, path: str, max_length: int | None = None) -> None:
    if max_length is not None and len(value) > max_length:
        raise _invalid(path, f"at most {max_length} characters")
    if "\x00" in value:
        raise _invalid(path, "contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(path, "contains an unpaired surrogate (not valid UTF-8)") from None


def _invalid(field: str, message: str) -> Problem:
    return Problem(
        422,
        "Invalid request",
        f"{field}: {message}",
        errors=[{"field": field, "message": message}],
    )


# The names api/templates/service.py was first written against.
_insert_run, _estimate_or_refuse, _check_storable = insert_run, estimate_or_refuse, check_storable
