"""How a run ends: `finish_run` moves it into a terminal state and does what that implies, its
quality gate, auto-promotion and webhook notifications, inside the caller's unit of work, so the
run never appears finished without its gate and the notifications are queued atomically with the
end they announce (a crash leaves both or neither).

Every end calls it: the trainer's final event (api/events/service.py), a cancel of a queued run
(api/runs/service.py), a failed dispatch and the reconciler noticing a dead execution
(api/dispatch/service.py). A live execution is not stopped here: cancelling a started run moves
it to `cancelling`, and the dispatch worker stops the execution, then finishes the run.
"""

from __future__ import annotations

import logging

from sqlmodel import Session

from api.events.models import Evaluation
from api.notify import service as notify
from api.runs.models import Run
from api.runs.states import TERMINAL, RunStatus
from api.runs.status import apply_transition
from api.templates.champions import add_champion, current_champion
from api.templates.gates import Check, EvalSummary, GateResult, Gates, evaluate
from api.templates.models import TemplateVersion

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


def finish_run(session: Session, run: Run, status: RunStatus, reason: str | None = None) -> None:
    """End `run` in the terminal `status` (raises IllegalTransition when the state machine
    forbids it), then record its gate, promote it if its template says so and it passed, and
    queue its webhooks. Adds to the caller's session; the caller commits."""
    if status not in TERMINAL:
        raise ValueError(f"{status.value} is not an end; set_status moves a run between states")
    apply_transition(session, run, status, reason)
    _after_end(session, run)


def _after_end(session: Session, run: Run) -> None:
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
