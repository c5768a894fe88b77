"""The dispatch worker's units of work on the database (the worker itself never commits).

Claiming is the part that must hold with several api replicas on one PostgreSQL: a run is
claimed by a conditional UPDATE that sets a lease (`claimed_by`, `claim_expires_at`) only if
nobody holds an unexpired one, and the count against `max_concurrency` and the claims happen in
one transaction that claimers take turns at (a transaction-level advisory lock on PostgreSQL,
the database's write lock on SQLite). Candidate rows are read `FOR UPDATE SKIP LOCKED`, so a
claimer never waits on a run another transaction is changing. A worker claims a small batch at
a time and renews each claim right before it starts the run (`renew_claim`), so a lease does not
run out while it works through the batch; one that outlives its worker (a crash between claim
and dispatch) expires, and the run is claimed again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, func, or_, text, update
from sqlmodel import Session, col, select

from api.db import utcnow
from api.dispatch.base import DispatchError, Execution, ExecutionStatus
from api.dispatch.stops import request_stop
from api.events import service as events
from api.runs.finish import finish_run
from api.runs.models import Run
from api.runs.service import lock_run
from api.runs.states import ACTIVE, RunStatus
from api.runs.status import set_status

# Any fixed 64-bit number: the key of the advisory lock claimers take turns at.
_CLAIM_LOCK_KEY = 0x7475_6E65_706C_616E  # "tuneplan"


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5  # transient errors in a row before the run fails
    first_backoff_seconds: float = 5.0  # doubles per attempt
    max_backoff_seconds: float = 300.0
    quota_retry_seconds: float = 60.0  # how soon to try again after a quota error
    # How long a run waits for a GPU (stock-out, quota) or for IAM to propagate before it fails
    # with the reason (settings.cloud_run_wait_seconds).
    wait_seconds: float = 3600.0


def _claimable(now: datetime) -> list[ColumnElement[bool]]:
    return [
        col(Run.status) == RunStatus.queued,
        or_(col(Run.not_before).is_(None), col(Run.not_before) <= now),
        or_(col(Run.claimed_by).is_(None), col(Run.claim_expires_at) <= now),
    ]


def claim_runs(
    session: Session, worker_id: str, *, max_concurrency: int, lease_seconds: int, batch: int
) -> list[str]:
    """Claim up to `batch` queued runs, and no more than there is room for; returns their ids,
    oldest first. The batch is small so that starting them all takes far less than a lease."""
    now = utcnow()
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CLAIM_LOCK_KEY})
    else:
        # A no-op write takes SQLite's write lock, so the count below cannot go stale.
        session.execute(update(Run).where(col(Run.id) == "").values(claimed_by=None))
    busy = session.exec(
        select(func.count()).where(
            or_(
                col(Run.status).in_(list(ACTIVE)),
                # Claimed by someone and not dispatched yet: it will be active in a moment.
                (col(Run.status) == RunStatus.queued)
                & col(Run.claimed_by).is_not(None)
                & (col(Run.claim_expires_at) > now),
            )
        )
    ).one()
    room = min(max_concurrency - busy, batch)
    if room <= 0:
        session.rollback()
        return []
    query = (
        select(Run.id)
        .where(*_claimable(now))
        .order_by(col(Run.created_at), col(Run.id))
        .limit(room)
        .with_for_update(skip_locked=True)  # rendered on PostgreSQL, ignored by SQLite
    )
    claimed = []
    for run_id in session.exec(query).all():
        result = session.execute(
            update(Run)
            .where(col(Run.id) == run_id, *_claimable(now))
            .values(claimed_by=worker_id, claim_expires_at=now + timedelta(seconds=lease_seconds))
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            claimed.append(run_id)
    session.commit()
    return claimed


def _held_by(run_id: str, worker_id: str) -> list[ColumnElement[bool]]:
    """The run is queued and claimed by this worker."""
    return [
        col(Run.id) == run_id,
        col(Run.status) == RunStatus.queued,
        col(Run.claimed_by) == worker_id,
    ]


def renew_claim(session: Session, run_id: str, worker_id: str, lease_seconds: int) -> Run | None:
    """Extend our claim right before starting the run, and return the run; None when it is not
    ours any more (cancelled, or our lease ran out and another worker took it)."""
    now = utcnow()
    result = session.execute(
        update(Run)
        .where(*_held_by(run_id, worker_id), col(Run.claim_expires_at) > now)
        .values(claim_expires_at=now + timedelta(seconds=lease_seconds))
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return None
    session.commit()
    return session.get(Run, run_id, populate_existing=True)


def mark_launch(session: Session, run_id: str, worker_id: str) -> bool:
    """Record, before `run_job`, that an execution of the current segment may start from now:
    if this worker dies before recording it, the next dispatch adopts it (never a second one)."""
    result = session.execute(
        update(Run).where(*_held_by(run_id, worker_id)).values(launched_at=utcnow())
    )
    session.commit()
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def record_execution(session: Session, run_id: str, worker_id: str, execution: Execution) -> bool:
    """Store the execution's handle and mark the run dispatched. False when the run stopped
    being ours meanwhile (cancelled, or our claim ran out): the execution's stop is queued in
    the same commit, for the worker to carry out (api/dispatch/stops.py)."""
    run = lock_run(session, run_id)
    run.execution_name = execution.name
    run.log_uri = execution.log_uri or run.log_uri
    run.artifact_uri = run.artifact_uri or execution.artifact_uri
    # A checkpoint reported by an earlier segment is more precise than the location.
    run.checkpoint_uri = run.checkpoint_uri or execution.checkpoint_uri
    ours = run.status == RunStatus.queued and run.claimed_by == worker_id
    # Whether or not the run is still ours, this execution is the one to watch (and to stop).
    run.execution_ended = False
    run.launched_at = None
    if ours:
        set_status(
            session,
            run,
            RunStatus.dispatched,
            f"segment {run.segment} started as {execution.name}",
        )
        run.claimed_by = run.claim_expires_at = None
        run.not_before = None
        run.dispatch_attempts = 0
        run.waiting_since = None
        # The trainer may have reported before this commit (a fast start): apply that now.
        events.replay_deferred(session, run)
    else:
        request_stop(
            session,
            run_id,
            execution.name,
            f"started after its run {run_id} stopped being this worker's ({run.status})",
            exits_by_itself=False,
        )
    session.add(run)
    session.commit()
    return ours


def dispatch_failed(
    session: Session, run_id: str, worker_id: str, error: DispatchError, policy: RetryPolicy
) -> str:
    """React to a failed start: back off and retry (transient), wait for quota (quota), or
    fail the run (permanent, or too many transient errors). Returns what was done."""
    run = lock_run(session, run_id)
    if run.status != RunStatus.queued or run.claimed_by != worker_id:
        session.rollback()
        return "the run is no longer ours"
    now = utcnow()
    run.claimed_by = run.claim_expires_at = None
    outcome: str
    if error.kind != "transient":
        # Nothing started (an ambiguous transient error may have started one: keep the marker).
        run.launched_at = None
    if error.kind == "permanent":
        finish_run(session, run, RunStatus.failed, f"dispatch failed: {error.message}")
        outcome = "failed"
    elif error.kind in ("quota", "iam"):
        outcome = _wait_for_platform(session, run, error, policy, now)
    else:
        run.dispatch_attempts += 1
        if run.dispatch_attempts >= policy.max_attempts:
            finish_run(
                session,
                run,
                RunStatus.failed,
                f"dispatch failed {run.dispatch_attempts} times in a row; the last error: "
                f"{error.message}",
            )
            outcome = "failed after retries"
        else:
            wait = min(
                policy.first_backoff_seconds * 2 ** (run.dispatch_attempts - 1),
                policy.max_backoff_seconds,
            )
            run.not_before = now + timedelta(seconds=wait)
            run.status_reason = (
                f"dispatch attempt {run.dispatch_attempts} of {policy.max_attempts} failed: "
                f"{error.message} (trying again at {run.not_before:%H:%M:%S} UTC)"
            )[:4000]
            outcome = f"retrying in {wait:g}s"
    run.updated_at = now
    session.add(run)
    session.commit()
    return outcome


def _wait_for_platform(
    session: Session, run: Run, error: DispatchError, policy: RetryPolicy, now: datetime
) -> str:
    """No GPU free (stock-out or quota), or IAM not applied yet (right after deploy.sh): keep
    the run queued and try again with backoff, for `policy.wait_seconds` in all; then fail it
    with the reason."""
    what = "a GPU" if error.kind == "quota" else "IAM permissions to propagate"
    run.waiting_since = run.waiting_since or now
    waited = (now - run.waiting_since).total_seconds()
    if waited >= policy.wait_seconds:
        finish_run(
            session,
            run,
            RunStatus.failed,
            f"dispatch failed: waited {waited:.0f}s for {what}; the last error: {error.message}",
        )
        run.waiting_since = None
        return "failed after waiting"
    # Backoff without a counter: wait about as long as the run has waited so far.
    remaining = max(policy.wait_seconds - waited, 0.0)
    wait = min(max(policy.quota_retry_seconds, waited), policy.max_backoff_seconds, remaining)
    run.not_before = now + timedelta(seconds=wait)
    run.status_reason = (
        f"waiting for {what} ({waited:.0f}s of {policy.wait_seconds:.0f}s): {error.message} "
        f"(trying again at {run.not_before:%H:%M:%S} UTC)"
    )[:4000]
    return f"waiting {wait:.0f}s for {what}"


def release_claims(session: Session, worker_id: str) -> None:
    """Give back the claims of a worker that stops before dispatching them."""
    session.execute(
        update(Run)
        .where(col(Run.claimed_by) == worker_id, col(Run.status) == RunStatus.queued)
        .values(claimed_by=None, claim_expires_at=None)
    )
    session.commit()


def runs_with_executions(
    session: Session, statuses: tuple[RunStatus, ...]
) -> list[tuple[str, str | None]]:
    """(run id, execution name) of the runs in `statuses`."""
    rows = session.exec(
        select(Run.id, Run.execution_name)
        .where(col(Run.status).in_(list(statuses)))
        .order_by(col(Run.created_at))
    ).all()
    session.rollback()  # read-only: end the transaction (and its snapshot) at once
    return [(run_id, name) for run_id, name in rows]


def execution_ended(
    session: Session, run_id: str, execution_name: str, status: ExecutionStatus
) -> str | None:
    """An execution ended and its run is still active: the trainer's final event never came
    (out of memory, killed, node lost, or it lies in a spool nobody can reach). Move the run
    on with the execution's own message. Returns the new status, or None if nothing changed
    (the run moved on, or another execution is current)."""
    run = lock_run(session, run_id)
    if run.execution_name == execution_name:
        run.execution_ended = True
    if run.status not in ACTIVE or run.execution_name != execution_name:
        session.add(run)
        session.commit()
        return None
    message = status.message or ""
    if run.status == RunStatus.cancelling:
        finish_run(session, run, RunStatus.cancelled, _join("cancelled", message))
    elif status.state == "cancelled":
        # Stopped outside tuneplane (the console, gcloud): it is cancelled all the same.
        set_status(session, run, RunStatus.cancelling)
        finish_run(
            session,
            run,
            RunStatus.cancelled,
            _join(f"execution {execution_name} was cancelled outside tuneplane", message),
        )
    elif status.state == "succeeded":
        finish_run(
            session,
            run,
            RunStatus.failed,
            f"execution {execution_name} ended without the trainer reporting a result "
            "(its final events were lost)",
        )
    else:
        finish_run(
            session,
            run,
            RunStatus.failed,
            _join(f"execution {execution_name} failed", message or "no reason given"),
        )
    session.commit()
    return str(run.status)


@dataclass(frozen=True)
class RunView:
    status: RunStatus
    execution_name: str | None
    segment: int
    launched: bool


def run_views(session: Session, run_ids: set[str]) -> dict[str, RunView]:
    """What the orphan sweep needs to know of each run an execution says it serves."""
    runs = session.exec(select(Run).where(col(Run.id).in_(list(run_ids)))).all()
    views = {
        r.id: RunView(RunStatus(r.status), r.execution_name, r.segment, r.launched_at is not None)
        for r in runs
    }
    session.rollback()
    return views


def finish_cancel_without_execution(session: Session, run_id: str) -> bool:
    """A run being cancelled that never got an execution: nothing to stop, so it is done."""
    run = lock_run(session, run_id)
    if run.status != RunStatus.cancelling or run.execution_name is not None:
        session.rollback()
        return False
    finish_run(session, run, RunStatus.cancelled, run.status_reason or "cancelled")
    session.commit()
    return True


def _join(head: str, message: str) -> str:
    return f"{head}: {message}" if message else head
