"""Champions: the run each template's new runs are compared with. Promotion appends a row, so
the history is every promotion in order and the current champion is the newest."""

from __future__ import annotations

from sqlmodel import Session, col, select

from api.errors import Problem
from api.runs.models import Run
from api.runs.states import RunStatus
from api.templates.models import Champion, ChampionPublic, PromoteRequest, RunTemplate
from api.templates.service import current_champion


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


def champion_run_ids(session: Session) -> set[str]:
    """The current champion of every template (for marking them in lists)."""
    out: set[str] = set()
    for name in session.exec(select(RunTemplate.name)):
        champion = current_champion(session, name)
        if champion is not None:
            out.add(champion.run_id)
    return out


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
