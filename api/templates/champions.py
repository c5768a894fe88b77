"""Champions: the run each template's new runs are compared with. Promotion appends a row, so
the history is every promotion in order and the current champion is the newest: latest
`promoted_at`, then highest id. That rule is written once, in `_is_current`; every question about
the current champion (of one template, among a page of runs) is a query built on it."""

from __future__ import annotations

from sqlalchemy import ColumnElement, and_, exists, or_
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from api.errors import Problem
from api.runs.models import Run
from api.runs.states import RunStatus
from api.templates.models import Champion, ChampionPublic, PromoteRequest, RunTemplate


def promote(session: Session, run_id: str, request: PromoteRequest, *, by: str) -> ChampionPublic:
    """Make a finished, gate-passing run of a template that template's champion by hand."""
    run = session.get(Run, run_id)
    if run is None:
        raise Problem(404, "Run not found", f"there is no run with id {run_id!r}")
    if run.template_name is None:
        raise Problem(
            409,
            "Not a template run",
            f"run {run_id} was not started from a template; champions belong to templates",
        )
    if run.status != RunStatus.succeeded:
        raise Problem(
            409,
            "Run not succeeded",
            f"run {run_id} is {run.status}; only a run that succeeded can be champion",
        )
    if run.gate_status == "failed" and not request.force:
        raise Problem(
            409,
            "Gate failed",
            f"run {run_id} failed its gate; send force=true with a note saying why it should be "
            "champion anyway",
            gate_reasons=run.gate_reasons or [],
        )
    template = session.get(RunTemplate, run.template_name)
    if template is None or template.deleted_at is not None:
        raise Problem(409, "Template deleted", f"template {run.template_name!r} was deleted")
    current = current_champion(session, run.template_name)
    if current is not None and current.run_id == run_id:
        return _public(session, current, current=True)
    row = add_champion(session, run, by=by, note=request.note)
    session.commit()
    return _public(session, row, current=True)


def add_champion(session: Session, run: Run, *, by: str, note: str = "") -> Champion:
    """Add the promotion row (the caller commits)."""
    assert run.template_name is not None
    row = Champion(template_name=run.template_name, run_id=run.id, promoted_by=by[:100], note=note)
    session.add(row)
    session.flush()
    return row


def history(session: Session, name: str) -> list[ChampionPublic]:
    """Every promotion of template `name`, newest first."""
    template = session.get(RunTemplate, name)
    if template is None or template.deleted_at is not None:
        raise Problem(404, "Template not found", f"there is no template named {name!r}")
    rows = list(
        session.exec(
            select(Champion)
            .where(Champion.template_name == name)
            .order_by(col(Champion.promoted_at).desc(), col(Champion.id).desc())
        )
    )
    return [_public(session, row, current=i == 0) for i, row in enumerate(rows)]


def _is_current() -> ColumnElement[bool]:
    """True for a promotion row that no newer row of its template supersedes."""
    newer = aliased(Champion)
    return ~exists().where(
        col(newer.template_name) == col(Champion.template_name),
        or_(
            col(newer.promoted_at) > col(Champion.promoted_at),
            and_(
                col(newer.promoted_at) == col(Champion.promoted_at),
                col(newer.id) > col(Champion.id),
            ),
        ),
    )


def current_champion(session: Session, name: str) -> Champion | None:
    """Template `name`'s current champion row (deleted or not: the gate of a run that finishes
    after its template was hidden still compares with it)."""
    stmt = select(Champion).where(Champion.template_name == name, _is_current())
    return session.exec(stmt).first()


def champions_among(session: Session, run_ids: list[str]) -> dict[str, str]:
    """{run id: template name} for those of `run_ids` that are their template's current
    champion, in one query whatever the number of runs or templates. A deleted (hidden)
    template has no champion to show."""
    if not run_ids:
        return {}
    rows = session.exec(
        select(Champion.run_id, Champion.template_name)
        .join(RunTemplate, col(RunTemplate.name) == col(Champion.template_name))
        .where(col(Champion.run_id).in_(run_ids), col(RunTemplate.deleted_at).is_(None))
        .where(_is_current())
    )
    return {run_id: template for run_id, template in rows}


def _public(session: Session, row: Champion, *, current: bool) -> ChampionPublic:
    run = session.get(Run, row.run_id)
    return ChampionPublic(
        template_name=row.template_name,
        run_id=row.run_id,
        promoted_at=row.promoted_at,
        promoted_by=row.promoted_by,
        note=row.note,
        current=current,
        final_accuracy=run.final_accuracy if run else None,
        final_macro_f1=run.final_macro_f1 if run else None,
        template_version=run.template_version if run else None,
    )
