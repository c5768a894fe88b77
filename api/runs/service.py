"""What can be done to runs, independent of HTTP: make one (`new_run`, behind create, retrain
and a template's trigger), cancel one, lock one for a change. The JSON routes and the dashboard
both call these; reading is api/runs/query.py. Each function takes a session and plain typed
arguments, returns public models (detached from the session), raises `api.errors.Problem` for
anything a person must fix, and commits its own unit of work (the rule in api/db.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlmodel import Session

from api.config import Settings
from api.db import lock_row
from api.dispatch.base import segment_length
from api.errors import Problem
from api.runs import idempotency, model_check
from api.runs.estimates import culprit, estimate, refusal_detail
from api.runs.finish import finish_run
from api.runs.local_paths import LocalPaths
from api.runs.models import RetrainRequest, Run, RunCreate, RunPublic, RunTag
from api.runs.query import find_run, get_run, not_found, tags_of
from api.runs.states import TERMINAL, RunStatus
from api.runs.status import set_status
from api.runs.validation import check_storable, check_tags
from trainer.contract.spec import GpuType, RunSpec, describe_errors

CREATE_SCOPE = "runs.create"
RETRAIN_SCOPE = "runs.retrain"


@dataclass(frozen=True)
class Created:
    run: RunPublic
    created: bool  # False: an earlier request with the same Idempotency-Key made this run

    @property
    def id(self) -> str:
        return self.run.id


# -- writing ------------------------------------------------------------------------------------


# Every write takes (session, settings, ...), so callers need not know which ones use settings.


@dataclass(frozen=True)
class NewRun:
    """What a new run is besides its spec, and where its parts sit in the request (for errors
    and the `Idempotency-Key`). `base` names the base spec in error fields: "body.spec",
    "stored spec" (a retrain's parent), "template spec"."""

    request: BaseModel  # the body, checked for text no database can store
    scope: str  # idempotency scope: one per creating route
    fingerprint: str  # idempotency.request_hash of the request and what the URL names
    idempotency_key: str | None
    name: str
    # Which of this machine's files the run may name (`LocalPaths.of`), the Hub the model check
    # reads, and the segment length the estimate counts with.
    settings: Settings
    notes: str = ""
    tags: Sequence[str] = ()
    base: str = "body.spec"
    # Read the model's own files (config.json, chat template) first, where `hub_url` or a local
    # directory has them: a model the trainer cannot fine-tune is refused before a GPU is paid
    # for, and its config sharpens the estimate.
    check_model: bool = False
    parent_id: str | None = None
    template_name: str | None = None
    template_version: int | None = None
    ci: dict[str, Any] | None = None


def new_run(
    session: Session, base_spec: dict[str, Any], overrides: dict[str, Any], meta: NewRun
) -> Created:
    """The one way a run is made (create, retrain, template trigger): `base_spec` with
    `overrides` applied must be a valid spec (422 naming each bad field, in the overrides or the
    base), the tags must be tags, the request storable, and the estimate must fit the GPU (422
    with the estimate). Then a queued run is stored, once per `Idempotency-Key`. Commits."""
    check_tags(meta.tags, "body.tags")
    spec = merged_spec(base_spec, overrides, meta.base)
    check_storable(meta.request.model_dump(mode="json"), "body")
    where = "body.overrides" if meta.base != "body.spec" else "body.spec"
    paths = LocalPaths.of(meta.settings)
    paths.check(spec, where)
    config = (
        model_check.check(spec.model_id, meta.settings.hub_url, paths) if meta.check_model else None
    )
    est = estimate_or_refuse(spec, meta.settings, where, config)

    def insert() -> str:
        run = Run(
            name=meta.name,
            notes=meta.notes,
            spec=spec.model_dump(mode="json"),
            model_id=spec.model_id,
            dataset=spec.dataset,
            gpu_type=spec.gpu_type,
            parent_id=meta.parent_id,
            estimate=est,
            template_name=meta.template_name,
            template_version=meta.template_version,
            ci=meta.ci,
        )
        session.add(run)
        session.flush()  # the run row first: run_tags points at it
        for tag in dict.fromkeys(meta.tags):
            session.add(RunTag(run_id=run.id, tag=tag))
        return run.id

    outcome = idempotency.create_once(
        session,
        scope=meta.scope,
        key=meta.idempotency_key,
        fingerprint=meta.fingerprint,
        create=insert,
    )
    return Created(get_run(session, outcome.resource_id), outcome.created)


def create_run(
    session: Session,
    settings: Settings,
    data: RunCreate,
    *,
    idempotency_key: str | None = None,
) -> Created:
    """Validate, estimate and store a queued run. A spec whose estimate cannot fit its GPU is
    refused (422, with the estimate). A spec that names no GPU gets `settings.default_gpu_type`."""
    spec = with_default_gpu(data.spec, settings.default_gpu_type)
    data = data.model_copy(update={"spec": spec})
    meta = NewRun(
        request=data,
        scope=CREATE_SCOPE,
        fingerprint=idempotency.request_hash(data),
        idempotency_key=idempotency_key,
        name=data.name,
        settings=settings,
        notes=data.notes,
        tags=data.tags,
        check_model=True,
    )
    return new_run(session, spec.model_dump(), {}, meta)


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
    parent = find_run(session, run_id)
    tags = request.tags if request.tags is not None else tags_of(session, [run_id])[run_id]
    meta = NewRun(
        request=request,
        scope=RETRAIN_SCOPE,
        fingerprint=idempotency.request_hash(request, parent_id=run_id),
        idempotency_key=idempotency_key,
        name=request.name if request.name is not None else parent.name,
        settings=settings,
        notes=request.notes if request.notes is not None else parent.notes,
        tags=tags,
        base="stored spec",
        parent_id=run_id,
    )
    return new_run(session, parent.spec, request.overrides, meta)


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
        finish_run(session, run, RunStatus.cancelled, reason)
    elif status != RunStatus.cancelling:
        set_status(session, run, RunStatus.cancelling, reason)
    session.commit()
    return get_run(session, run_id)


def lock_run(session: Session, run_id: str) -> Run:
    """Load a run for a change of status, locked against concurrent writers until the caller
    commits (api/db.py `lock_row`); 404 when there is none."""
    run = lock_row(session, Run, run_id)
    if run is None:
        raise not_found(run_id)
    return run


# -- helpers ------------------------------------------------------------------------------------


def with_default_gpu(spec: RunSpec, default: GpuType | None) -> RunSpec:
    """`spec` with the server's default GPU when it names none (a run, a template's spec)."""
    if default is None or "gpu_type" in spec.model_fields_set:
        return spec
    return RunSpec.model_validate({**spec.model_dump(), "gpu_type": default})


def merged_spec(base: dict[str, Any], overrides: dict[str, Any], base_name: str) -> RunSpec:
    """`base` with `overrides` applied, as a spec; a 422 whose fields say which side is wrong."""
    try:
        return RunSpec.model_validate({**base, **overrides})
    except ValidationError as exc:
        errors = describe_errors(exc)
        for err in errors:
            top = err["field"].split(".", 1)[0]
            where = "body.overrides" if top in overrides else base_name
            err["field"] = f"{where}.{err['field']}"
        raise Problem(
            422,
            "Invalid overrides",
            f"the {base_name} with these overrides is not valid: "
            + "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5]),
            errors=errors,
        ) from None


def estimate_or_refuse(
    spec: RunSpec, settings: Settings, field: str, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The spec's estimate as stored on `Run.estimate`, with the segments the worker will
    give it under `settings`; a 422 problem carrying the estimate when it cannot fit its GPU
    (`field` is where the spec sits in the request)."""
    segment = segment_length(settings, spec)
    est = estimate(spec, segment, config)
    if est.fits is False:
        detail = refusal_detail(spec, est, segment)
        memory_fits = est.memory is not None and est.memory.total_gib <= est.memory.gpu_gib
        blamed = (culprit(est.notes) if memory_fits else None) or "gpu_type"
        raise Problem(
            422,
            "Run does not fit the GPU",
            detail,
            estimate=est.model_dump(mode="json"),
            errors=[{"field": f"{field}.{blamed}", "message": detail}],
        )
    return est.model_dump(mode="json")
