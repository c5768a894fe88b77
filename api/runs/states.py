"""The run state machine (docs/architecture.md, "Run states"), the only place that decides a status
change.

    queued -> dispatched -> running -> succeeded | failed | cancelled
    cancelling while a cancel is in flight; running -> queued between segments.

Terminal states never change again. Some edges look early on purpose: callbacks can arrive out of
order (a trainer's `completed` may land before its `started` was stored), so a dispatched run may
finish directly, and a run being cancelled may still end as it really ended.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol


class RunStatus(StrEnum):
    queued = "queued"
    dispatched = "dispatched"
    running = "running"
    cancelling = "cancelling"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


S = RunStatus
TERMINAL = frozenset({S.succeeded, S.failed, S.cancelled})
ACTIVE = frozenset({S.dispatched, S.running, S.cancelling})

ALLOWED: dict[RunStatus, frozenset[RunStatus]] = {
    # queued -> failed: a permanent dispatch error (bad image, no permission).
    S.queued: frozenset({S.dispatched, S.cancelled, S.failed}),
    # dispatched -> queued: the first segment ended before its `started` was seen.
    S.dispatched: frozenset({S.running, S.queued, S.cancelling, S.succeeded, S.failed}),
    S.running: frozenset({S.queued, S.cancelling, S.succeeded, S.failed}),
    S.cancelling: frozenset({S.cancelled, S.succeeded, S.failed}),
    S.succeeded: frozenset(),
    S.failed: frozenset(),
    S.cancelled: frozenset(),
}


class IllegalTransition(ValueError):
    def __init__(self, current: RunStatus, new: RunStatus) -> None:
        self.current, self.new = current, new
        allowed = ", ".join(sorted(ALLOWED[current])) or "nothing (it is final)"
        super().__init__(f"a {current} run cannot become {new}; from {current}: {allowed}")


def check_transition(current: RunStatus | str, new: RunStatus | str) -> RunStatus:
    """Return `new` as a RunStatus if `current -> new` is allowed, else raise IllegalTransition."""
    cur, nxt = RunStatus(current), RunStatus(new)
    if nxt not in ALLOWED[cur]:
        raise IllegalTransition(cur, nxt)
    return nxt


def is_terminal(status: RunStatus | str) -> bool:
    return RunStatus(status) in TERMINAL


class _Timed(Protocol):  # a Run, a RunPublic (read-only, so a RunStatus passes for a str)
    @property
    def status(self) -> str: ...
    @property
    def started_at(self) -> datetime | None: ...
    @property
    def finished_at(self) -> datetime | None: ...
    @property
    def updated_at(self) -> datetime: ...


def duration_seconds(run: _Timed, now: datetime | None = None) -> float | None:
    """A run's duration, the one definition every page, answer and client shows: from its
    trainer's start (`started_at`, the first `running`) to its end (`finished_at`), or to now
    while it is active; time spent queued before the start is not counted. None before it
    started. A run queued between segments counts up to its last change."""
    if run.started_at is None:
        return None
    if run.finished_at is not None:
        end = run.finished_at
    elif RunStatus(run.status) in ACTIVE:
        end = now or datetime.now(UTC)
    else:
        end = run.updated_at
    return max(0.0, (end - run.started_at).total_seconds())
