"""The one way a run's status changes: through the state machine, with timestamps kept right."""

from __future__ import annotations

from sqlmodel import Session

from api.db import utcnow
from api.runs.models import Run
from api.runs.states import TERMINAL, RunStatus, check_transition


def set_status(session: Session, run: Run, new: RunStatus, reason: str | None = None) -> None:
    """Move `run` to `new` (raises IllegalTransition when the state machine forbids it).
    Adds the run to the session; the caller's service function commits."""
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
    if status in TERMINAL:
        # Every end of a run passes here: its quality gate and notifications go in the same unit
        # of work (imported late: that module imports the services that import this one).
        from api.runs.finish import on_run_finished

        on_run_finished(session, run)
