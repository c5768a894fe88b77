"""Run templates under /api/v1/templates: named specs with quality gates, and their runs.

`PUT` makes a new version (content equal to the current version's makes none); `DELETE` hides
the template and keeps its versions, runs and champions. `POST /templates/{name}/runs` is what a
CI pipeline calls: it honours `Idempotency-Key` (a retried job gets the run the first attempt
made: 200 with `Idempotent-Replayed: true`) and answers with the run's API and dashboard URLs.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Path, Request, Response

from api.auth.access import principal_of
from api.deps import SessionDep, SettingsDep
from api.errors import problem_responses, require_json
from api.runs.idempotency import KEY_PATTERN
from api.templates import champions, service
from api.templates.models import (
    TEMPLATE_NAME,
    ChampionPublic,
    TemplateBody,
    TemplateCreate,
    TemplatePublic,
    TemplateRunCreated,
    TemplateRunRequest,
    TemplateVersionPublic,
)

router = APIRouter(prefix="/templates", tags=["templates"])

Name = Annotated[str, Path(pattern=TEMPLATE_NAME, description="a template's name")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        pattern=KEY_PATTERN,
        description="repeat a trigger safely: the same key and body give the same run (200, "
        "`Idempotent-Replayed: true`); the same key with another body is a 409",
    ),
]


@router.post(
    "",
    status_code=201,
    response_model=TemplatePublic,
    summary="Create a template",
    dependencies=[Depends(require_json)],
    responses=problem_responses(409, 415, 422),
)
def create_template(
    body: TemplateCreate,
    session: SessionDep,
    settings: SettingsDep,
    request: Request,
    response: Response,
) -> TemplatePublic:
    template = service.create_template(
        session, body, settings, created_by=principal_of(request).name
    )
    response.headers["Location"] = f"/api/v1/templates/{template.name}"
    return template


@router.get("", response_model=list[TemplatePublic], summary="List templates")
def list_templates(session: SessionDep) -> list[TemplatePublic]:
    return service.list_templates(session)


@router.get(
    "/{name}",
    response_model=TemplatePublic,
    summary="Get a template (its current version)",
    responses=problem_responses(404, 422),
)
def get_template(name: Name, session: SessionDep) -> TemplatePublic:
    return service.get_template(session, name)


@router.put(
    "/{name}",
    response_model=TemplatePublic,
    summary="Edit a template: a new version",
    dependencies=[Depends(require_json)],
    responses=problem_responses(404, 415, 422),
)
def update_template(
    name: Name,
    body: TemplateBody,
    session: SessionDep,
    settings: SettingsDep,
    request: Request,
    response: Response,
) -> TemplatePublic:
    """The body replaces the template's content and becomes its next version; runs already
    made keep the version they came from."""
    template, changed = service.update_template(
        session, name, body, settings, created_by=principal_of(request).name
    )
    if not changed:
        response.headers["X-Tuneplane-Unchanged"] = "true"
    return template


@router.delete(
    "/{name}",
    status_code=204,
    summary="Delete (hide) a template",
    responses=problem_responses(404, 422),
)
def delete_template(name: Name, session: SessionDep) -> Response:
    service.delete_template(session, name)
    return Response(status_code=204)


@router.get(
    "/{name}/versions",
    response_model=list[TemplateVersionPublic],
    summary="Every version of a template, newest first",
    responses=problem_responses(404, 422),
)
def list_versions(name: Name, session: SessionDep) -> list[TemplateVersionPublic]:
    return service.list_versions(session, name)


@router.get(
    "/{name}/champions",
    response_model=list[ChampionPublic],
    summary="Champion history of a template, newest (current) first",
    responses=problem_responses(404, 422),
)
def champion_history(name: Name, session: SessionDep) -> list[ChampionPublic]:
    return champions.history(session, name)


_TRIGGERED: dict[int | str, dict[str, Any]] = {
    201: {"description": "run queued"},
    200: {
        "description": "an earlier request with this Idempotency-Key queued the run",
        "model": TemplateRunCreated,
    },
}


@router.post(
    "/{name}/runs",
    status_code=201,
    response_model=TemplateRunCreated,
    summary="Trigger a run of a template (CI retrains)",
    dependencies=[Depends(require_json)],
    responses={**_TRIGGERED, **problem_responses(404, 409, 415, 422)},
)
def trigger_run(
    name: Name,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
    body: Annotated[TemplateRunRequest | None, Body()] = None,
    idempotency_key: IdempotencyKey = None,
) -> TemplateRunCreated:
    """Queue a run of the template's current version, with `overrides` replacing spec fields
    and `ci` (git sha, pipeline URL, ref, repository) stored with it."""
    created, is_new = service.trigger_run(
        session,
        settings,
        name,
        body or TemplateRunRequest(),
        idempotency_key=idempotency_key,
    )
    response.headers["Location"] = f"/api/v1/runs/{created.run_id}"
    if not is_new:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return created
