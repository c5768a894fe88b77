"""When a segment must stop: its deadline is near, the platform sent SIGTERM, or (tests) it has
taken its `max_steps` optimizer steps.

Cloud Run sends SIGTERM (then SIGKILL about 10 s later) when a task times out, is cancelled or
its machine goes into maintenance. Both cases end the same way: save a checkpoint, report
`segment_done`, exit 0. The handler only sets a flag; the training loop and the evaluation
batches poll `should_stop` at points where a checkpoint is consistent.

`max_steps` (TUNEPLANE_SEGMENT_MAX_STEPS) exists so tests can end segments at a step they choose:
a deadline ends one wherever the machine's speed got to, so a test of "a run in several segments"
would pass or fail with the load on the machine. Production sets no step limit.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from types import FrameType

MIN_MARGIN_S = 60.0
MAX_MARGIN_FRACTION = 0.25


class SegmentEnd(Exception):  # a stop, not an error: no -Error suffix
    """Raised where work stops because the segment is over; `main` saves and reports it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Stopper:
    def __init__(
        self,
        deadline: datetime | None,
        now: datetime | None = None,
        max_steps: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if deadline is not None and deadline.tzinfo is None:
            deadline = deadline.replace(tzinfo=UTC)  # the zone every dispatcher writes
        self.deadline = deadline
        self.max_steps = max_steps
        self.steps = 0  # optimizer steps taken in this segment
        start = now or datetime.now(UTC)
        # Monotonic from here on: wall clocks can jump, the budget should not. (`clock` is
        # there for tests, which advance time by hand instead of waiting for it.)
        self._clock = clock
        self._t0 = clock()
        self._budget = (deadline - start).total_seconds() if deadline is not None else float("inf")
        self.save_seconds: float | None = None  # the last checkpoint save, measured
        self.signal_name: str | None = None
        # Set once this segment has done a unit of work that survives it (the baseline saved,
        # an optimizer step); see `should_stop`.
        self.progressed = False

    @contextmanager
    def handling_sigterm(self) -> Iterator[None]:
        """Turn SIGTERM into a stop request while inside; the previous handler comes back after
        (the CLI also runs inside other processes: tests, the bench script)."""
        previous = signal.signal(signal.SIGTERM, self._on_signal)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def budget_seconds(self) -> float:
        return self._budget

    def seconds_left(self) -> float:
        return self._budget - (self._clock() - self._t0)

    def margin(self) -> float:
        """Time kept in reserve for the final save: at least a minute or twice the last save,
        but never more than a quarter of the segment, or short segments would do no work."""
        wanted = max(MIN_MARGIN_S, 2 * (self.save_seconds or 0.0))
        return min(wanted, MAX_MARGIN_FRACTION * self._budget)

    def should_stop(self, next_work_seconds: float = 0.0) -> str | None:
        """Why to stop now (SIGTERM, or the next piece of work would eat into the margin)."""
        if self.signal_name:
            return f"received {self.signal_name}"
        if self.deadline is None:
            return None
        if not self.progressed:
            # A segment that stopped with nothing done (loading ate its budget) would be
            # followed by one that does the same, forever; the task timeout stays the limit.
            return None
        if self.seconds_left() - next_work_seconds < self.margin():
            return f"deadline {self.deadline.isoformat()} is near"
        return None

    def step_taken(self) -> None:
        """One optimizer step is done: work that survives this segment."""
        self.steps += 1
        self.progressed = True

    def should_stop_after_step(self, next_step_seconds: float) -> str | None:
        """`should_stop`, and the step limit. Asked only between optimizer steps: a segment at
        its limit still finishes the run's evaluation and uploads when training is done."""
        if self.max_steps is not None and self.steps >= self.max_steps:
            return f"took its {self.steps} optimizer steps (the segment's step limit)"
        return self.should_stop(next_step_seconds)

    def check(self, next_work_seconds: float = 0.0) -> None:
        reason = self.should_stop(next_work_seconds)
        if reason:
            raise SegmentEnd(reason)
