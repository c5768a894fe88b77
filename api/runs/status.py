"""The one way a run's status changes: through the state machine, with timestamps kept right.

`set_status` moves a run between the states of its life (queued, dispatched, running,
cancelling); it refuses a terminal state, because a run's end implies more than a new status
(the stop of its execution, its gate, promotion, webhooks): that is `finish_run`
(api/runs/finish.py), which every end goes through. Both move the state with `apply_transition`.
"""

from __future__ import annotations

from sqlmodel import Session

from api.db import utcnow
from api.runs.models import Run
from api.runs.states import TERMINAL, RunStatus, check_transition


def set_status(session: Session, run: Run, new: RunStatus, reason: str | None = None) -> None:
    """Move `run` to the non-terminal `new` (raises IllegalTransition when the state machine
    forbids it). Adds the run to the session; the caller's service function commits."""
    if new in TERMINAL:
        raise ValueError(f"a run ends through finish_run, not set_status (asked for {new.value})")
    apply_transition(session, run, new, reason)


def apply_transition(session: Session, run: Run, new: RunStatus, reason: str | None) -> None:
    """The move itself, terminal or not: the state machine, the reason, the timestamps."""
    status = check_transition(run.status, new)
    now = utcnow()
    run.status = status
    if reason is not None:
        run.status_reason = reason[:4000]
    if status == RunStatus.running and run.started_at is None:
        run.started_at = now
    if status in TERMINAL:
        run.finished_at = now
        run.claimed_by = run.claim_expires_at = None
    run.updated_at = now
    session.add(run)
