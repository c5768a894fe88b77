"""The run state machine (DESIGN.md "Run states"), the only place that decides a status change.

    queued -> dispatched -> running -> succeeded | failed | cancelled
    cancelling while a cancel is in flight; running -> queued between segments.

Terminal states never change again. Some edges look early on purpose: callbacks can arrive out of
order (a trainer's `completed` may land before its `started` was stored), so a dispatched run may
finish directly, and a run being cancelled may still end as it really ended.
"""

from __future__ import annotations

from enum import StrEnum


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
