"""How a run ends: `finish_run` moves it into a terminal state and does what that implies: the
stop of its execution if that may still run, its quality gate, auto-promotion and webhook
notifications, all inside the caller's unit of work. So the run never appears finished without
its gate, and the stop and the notifications are queued atomically with the end they follow (a
crash leaves all or none); the dispatch worker and the notifier act on them after the commit
(api/dispatch/stops.py, api/notify/service.py), never inside the transaction.

Every end calls it: the trainer's final event (api/events/service.py), a cancel of a queued run
(api/runs/service.py), a failed dispatch, the reconciler noticing a dead execution and the end
of a cancel (api/dispatch/service.py). Cancelling a started run is not an end: it moves the run
to `cancelling`, the worker stops the execution, and the run ends once it has.
"""

from __future__ import annotations

import logging

from sqlmodel import Session

from api.dispatch.stops import request_stop
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
    forbids it), queue the stop of its execution unless that was seen ended, record its gate,
    promote it if its template says so and it passed, and queue its webhooks. Adds to the
    caller's session; the caller commits."""
    if status not in TERMINAL:
        raise ValueError(f"{status.value} is not an end; set_status moves a run between states")
    apply_transition(session, run, status, reason)
    if run.execution_name is not None and not run.execution_ended:
        # Such an execution's trainer has said it is done (the run's final event, or the
        # `segment_done` that queued the run for its next segment): it exits by itself, and is
        # cancelled only if it hangs or a platform retry starts after the verdict.
        request_stop(
            session,
            run.id,
            run.execution_name,
            f"its run {run.id} is {status.value}",
            exits_by_itself=True,
        )
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
