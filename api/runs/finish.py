"""What happens when a run ends: its quality gate, auto-promotion, and webhook notifications.

Called by `set_status` (api/runs/status.py) for every move into a terminal state, inside the
unit of work that makes the move, so the run never appears finished without its gate and the
notifications are queued atomically with the end they announce (a crash leaves both or neither).
Every terminal move goes through `set_status`: the trainer's final event, a cancel, a failed
dispatch, the reconciler noticing a dead execution.
"""

from __future__ import annotations

import logging

from sqlmodel import Session

from api.events.models import Evaluation
from api.notify import service as notify
from api.runs.models import Run
from api.templates.champions import add_champion
from api.templates.gates import Check, EvalSummary, GateResult, Gates, evaluate
from api.templates.models import TemplateVersion
from api.templates.service import current_champion

log = logging.getLogger("tuneplane.gates")


def _summary(session: Session, run_id: str) -> EvalSummary | None:
    row = session.get(Evaluation, (run_id, "final"))
    if row is None:
        return None
    return EvalSummary(row.accuracy, row.macro_f1, row.unknown_rate, row.predictions)


def _gate(session: Session, run: Run, version: TemplateVersion) -> GateResult:
    gates = Gates.model_validate(version.gates)
    champion = current_champion(session, version.name)
    champion_eval = None
    champion_id = None
    if champion is not None and champion.run_id != run.id:
        champion_id = champion.run_id
        champion_eval = _summary(session, champion.run_id)
        if champion_eval is None and gates.uses_champion:
            return GateResult(
                "failed",
                [
                    Check(
                        "champion",
                        "failed",
                        f"champion {champion_id} has no final evaluation to compare with",
                    )
                ],
            )
    return evaluate(gates, str(run.status), _summary(session, run.id), champion_eval, champion_id)


def on_run_finished(session: Session, run: Run) -> None:
    """Record the run's gate; promote it if its template says so and it passed; queue its
    webhooks. Adds to the caller's session; the caller commits."""
    if run.template_name is None or run.template_version is None:
        run.gate_status = "not_applicable"
        run.gate_reasons = [
            Check("template", "not_applicable", "not started from a template: no gates").as_dict()
        ]
        session.add(run)
        return
    version = session.get(TemplateVersion, (run.template_name, run.template_version))
    if version is None:
        result = GateResult(
            "failed",
            [Check("template", "failed", f"template version {run.template_version} is gone")],
        )
    else:
        try:
            result = _gate(session, run, version)
        except Exception as exc:  # a gate bug must never keep a run from finishing
            log.exception("evaluating the gate of run %s failed", run.id)
            result = GateResult(
                "failed",
                [Check("gates", "failed", f"the gates could not be evaluated: {exc!r}")],
            )
    run.gate_status, run.gate_reasons = result.status, result.reasons
    session.add(run)
    promoted = False
    if version is not None and version.auto_promote and result.status == "passed":
        add_champion(session, run, by="auto", note="passed its gates (auto-promote)")
        promoted = True
    if version is not None and version.webhooks:
        notify.enqueue(session, run, version, promoted=promoted)
