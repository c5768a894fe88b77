"""Run templates: create, edit (a new version each time), hide, read, and trigger a run.

Each function takes a session and plain typed arguments, raises `api.errors.Problem` for what a
person must fix, and commits its own unit of work (api/db.py). Triggering goes through the runs
service's insert and idempotency helpers, so a templated run is stored exactly like any other
run, plus the template (name, version) and CI context it came from.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from api.config import Settings
from api.db import lock_row, utcnow
from api.errors import Problem, invalid
from api.notify.address_guard import refuse_internal
from api.notify.models import is_display_form, is_template_form, template_url
from api.runs import idempotency
from api.runs import service as runs_service
from api.runs.models import Run
from api.templates.champions import current_champion
from api.templates.gates import Gates
from api.templates.models import (
    RunTemplate,
    TemplateBody,
    TemplateCreate,
    TemplatePublic,
    TemplateRunCreated,
    TemplateRunRequest,
    TemplateVersion,
    TemplateVersionPublic,
    WebhookIn,
    WebhookOut,
)

TRIGGER_SCOPE = "templates.trigger"


# ---- reading ---------------------------------------------------------------------------------


def _find(session: Session, name: str, *, lock: bool = False) -> RunTemplate:
    """The template `name` (404 when there is none or it was deleted); with `lock`, read fresh
    and locked until the caller commits (api/db.py `lock_row`)."""
    template = lock_row(session, RunTemplate, name) if lock else session.get(RunTemplate, name)
    if template is None or template.deleted_at is not None:
        raise Problem(404, "Template not found", f"there is no template named {name!r}")
    return template


def _version(session: Session, name: str, version: int) -> TemplateVersion:
    row = session.get(TemplateVersion, (name, version))
    if row is None:  # only if the database was edited by hand
        raise Problem(404, "Template version not found", f"{name!r} has no version {version}")
    return row


def _webhooks_out(hooks: list[dict[str, Any]]) -> list[WebhookOut]:
    # Scheme and host only: a receiver's credential is often the URL's path (Slack, Teams); the
    # tag lets a body sent back name the hook it keeps (`_webhooks`).
    return [
        WebhookOut(url=template_url(h["url"]), has_own_secret=bool(h.get("secret"))) for h in hooks
    ]


def _shown(version: TemplateVersion) -> dict[str, Any]:
    """The fields of TemplateContent a version gives, but `created_at` (whose time it is
    depends on the view: the template's or the version's)."""
    return {
        "name": version.name,
        "version": version.version,
        "description": version.description,
        "spec": version.spec,
        "gates": Gates.model_validate(version.gates),
        "webhooks": _webhooks_out(version.webhooks),
        "auto_promote": version.auto_promote,
    }


def _public(session: Session, template: RunTemplate, version: TemplateVersion) -> TemplatePublic:
    champion = current_champion(session, template.name)
    return TemplatePublic(
        **_shown(version),
        created_at=template.created_at,
        updated_at=template.updated_at,
        version_created_by=version.created_by,
        champion_run_id=champion.run_id if champion else None,
    )


def recent_runs(session: Session, name: str, limit: int) -> list[Run]:
    """The newest `limit` runs made from template `name`, newest first."""
    stmt = (
        select(Run)
        .where(Run.template_name == name)
        .order_by(col(Run.created_at).desc())
        .limit(limit)
    )
    return list(session.exec(stmt).all())


def get_template(session: Session, name: str) -> TemplatePublic:
    template = _find(session, name)
    return _public(session, template, _version(session, name, template.version))


def list_templates(session: Session) -> list[TemplatePublic]:
    rows = session.exec(
        select(RunTemplate)
        .where(col(RunTemplate.deleted_at).is_(None))
        .order_by(col(RunTemplate.name))
    )
    return [_public(session, t, _version(session, t.name, t.version)) for t in rows]


def list_versions(session: Session, name: str) -> list[TemplateVersionPublic]:
    _find(session, name)
    rows = session.exec(
        select(TemplateVersion)
        .where(TemplateVersion.name == name)
        .order_by(col(TemplateVersion.version).desc())
    )
    return [
        TemplateVersionPublic(**_shown(v), created_at=v.created_at, created_by=v.created_by)
        for v in rows
    ]


# ---- writing ---------------------------------------------------------------------------------


def _content(body: TemplateBody, settings: Settings, kept: list[dict[str, Any]]) -> dict[str, Any]:
    """The stored form of a template's content. The spec is stored with every default filled
    in, so a later change of a default does not change what the template's runs do. `kept`:
    the webhooks a URL shown redacted may stand for (`_webhooks`)."""
    spec = runs_service.with_default_gpu(body.spec, settings.default_gpu_type)
    runs_service.estimate_or_refuse(spec, settings, "body.spec")
    webhook_secret_set = settings.webhook_secret is not None
    webhooks = _webhooks(body.webhooks, kept)
    for i, hook in enumerate(webhooks):
        refused = refuse_internal(hook["url"], settings.webhook_allowed_networks)
        if refused is not None:
            raise invalid(f"body.webhooks.{i}.url", refused)
        if hook["secret"] is None and not webhook_secret_set:
            message = "needs a `secret` (the server has no TUNEPLANE_WEBHOOK_SECRET to sign with)"
            raise invalid(f"body.webhooks.{i}.secret", message)
    content = {
        "description": body.description,
        "spec": spec.model_dump(mode="json"),
        "gates": body.gates.model_dump(mode="json"),
        "webhooks": webhooks,
        "auto_promote": body.auto_promote,
    }
    runs_service.check_storable(content, "body")
    return content


def _webhooks(hooks: list[WebhookIn], kept: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The webhooks to store. A URL in the form template views show it (`template_url`:
    scheme and host, the hook's tag) stands for the kept webhook with that tag: its whole URL
    and its secret. A whole URL that a kept webhook has keeps that one's secret too. Either
    way a `secret` sent with it replaces the kept one. So a body that sends back what GET
    returned, or the edit form sent unchanged, keeps every URL and secret, and the shown form
    is never stored. A URL as logs show it (`display_url`, no tag) is refused: it cannot say
    which of two hooks on one host it means."""
    shown = {template_url(h["url"]): h for h in kept}
    whole = {h["url"]: h for h in kept}
    out: list[dict[str, Any]] = []
    for i, hook in enumerate(hooks):
        match = shown.get(hook.url) or whole.get(hook.url)
        if match is None and (is_template_form(hook.url) or is_display_form(hook.url)):
            message = (
                f"{hook.url!r} is a webhook URL as the api shows it (its path left out), and "
                "no webhook of the template is shown so: give the whole URL, or the line as "
                "the template shows it (with its #k= tag)"
            )
            raise invalid(f"body.webhooks.{i}.url", message)
        if match is None:
            out.append(hook.model_dump(mode="json"))
            continue
        secret = hook.secret if hook.secret is not None else match.get("secret")
        out.append({"url": match["url"], "secret": secret})
    return out


def _current_webhooks(session: Session, name: str | None) -> list[dict[str, Any]]:
    """The webhooks of template `name`'s current version; none when there is no such template."""
    template = session.get(RunTemplate, name) if name else None
    if template is None or template.deleted_at is not None:
        return []
    return list(_version(session, template.name, template.version).webhooks)


def create_template(
    session: Session,
    body: TemplateCreate,
    settings: Settings,
    *,
    created_by: str = "",
    copy_of: str | None = None,
) -> TemplatePublic:
    """A new template at version 1 (or, for a name that was deleted, the next version number:
    a (name, version) pair never names two different specs). `copy_of`: the template the body
    was copied from (the dashboard's Copy), whose webhooks its redacted URLs stand for; they
    resolve against that template only (by tag), so a line shown for another is refused."""
    content = _content(body, settings, _current_webhooks(session, copy_of))
    existing = session.get(RunTemplate, body.name)
    if existing is not None and existing.deleted_at is None:
        raise Problem(
            409,
            "Template exists",
            f"a template named {body.name!r} exists (version {existing.version}); "
            f"PUT /api/v1/templates/{body.name} edits it",
        )
    now = utcnow()
    if existing is None:
        template = RunTemplate(name=body.name, version=1, created_at=now, updated_at=now)
    else:
        template = existing
        template.version, template.deleted_at, template.updated_at = existing.version + 1, None, now
    session.add(template)
    session.flush()
    version = TemplateVersion(
        name=body.name, version=template.version, created_by=created_by[:100], **content
    )
    session.add(version)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Problem(
            409, "Template exists", f"a template named {body.name!r} was just created"
        ) from None
    return _public(session, template, version)


def update_template(
    session: Session,
    name: str,
    body: TemplateBody,
    settings: Settings,
    *,
    created_by: str = "",
) -> tuple[TemplatePublic, bool]:
    """Replace the content, making a new version; (template, whether a version was made).
    Content equal to the current version's makes none, so a retried PUT is harmless. A webhook
    URL sent back as the api shows it keeps the current version's URL and secret."""
    template = _find(session, name, lock=True)
    current = _version(session, name, template.version)
    content = _content(body, settings, current.webhooks)
    if all(getattr(current, k) == v for k, v in content.items()):
        session.rollback()  # release the lock taken above
        return _public(session, template, current), False
    template.version += 1
    template.updated_at = utcnow()
    version = TemplateVersion(
        name=name, version=template.version, created_by=created_by[:100], **content
    )
    session.add(template)
    session.add(version)
    session.commit()
    return _public(session, template, version), True


def delete_template(session: Session, name: str) -> None:
    """Hide the template; its versions, runs and champions stay for the record."""
    template = _find(session, name, lock=True)
    template.deleted_at = template.updated_at = utcnow()
    session.add(template)
    session.commit()


# ---- triggering ------------------------------------------------------------------------------


def trigger_run(
    session: Session,
    settings: Settings,
    name: str,
    request: TemplateRunRequest,
    *,
    idempotency_key: str | None = None,
) -> tuple[TemplateRunCreated, bool]:
    """Queue a run of the template's current version with `request.overrides` applied;
    (response, whether this request made the run: False when an Idempotency-Key replays)."""
    template = _find(session, name)
    version = _version(session, name, template.version)
    ci = request.ci.model_dump(exclude_none=True) if request.ci else None
    run_name = request.name
    if run_name is None:
        sha = f" @ {ci['git_sha'][:10]}" if ci and ci.get("git_sha") else ""
        run_name = f"{name} v{version.version}{sha}"
    meta = runs_service.NewRun(
        request=request,
        scope=TRIGGER_SCOPE,
        fingerprint=idempotency.request_hash(request, template=name),
        idempotency_key=idempotency_key,
        name=run_name,
        settings=settings,
        notes=request.notes or "",
        tags=[f"template:{name}", *(request.tags or [])],
        base="template spec",
        template_name=name,
        template_version=version.version,
        ci=ci,
    )
    created = runs_service.new_run(session, version.spec, request.overrides, meta)
    run = created.run
    base = settings.public_url.rstrip("/")
    return (
        TemplateRunCreated(
            run_id=run.id,
            template=name,
            template_version=run.template_version or version.version,
            url=f"{base}/api/v1/runs/{run.id}",
            dashboard_url=f"{base}/runs/{run.id}",
            run=run,
        ),
        created.created,
    )
