"""When a segment stops: margins before the deadline, the step limit, and SIGTERM.

The deadline's arithmetic runs on a clock the tests advance by hand, so no outcome here depends
on how long the machine takes between two lines."""

from __future__ import annotations

import os
import signal
from datetime import UTC, datetime, timedelta

import pytest

from trainer.deadline import SegmentEnd, Stopper


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _stopper(seconds: float, clock: Clock | None = None, **kw: int) -> Stopper:
    now = datetime.now(UTC)
    return Stopper(now + timedelta(seconds=seconds), now=now, clock=clock or Clock(), **kw)


def test_no_deadline_never_stops() -> None:
    stopper = Stopper(None)
    assert stopper.should_stop(next_work_seconds=1e9) is None


def test_margin_is_a_minute_or_twice_the_last_save_within_a_quarter_of_the_budget() -> None:
    long = _stopper(3600)
    assert long.margin() == 60
    long.save_seconds = 45
    assert long.margin() == 90
    short = _stopper(100)
    assert short.margin() == 25


def test_stops_when_the_next_step_would_eat_into_the_margin() -> None:
    clock = Clock()
    stopper = _stopper(400, clock)  # margin 60 s
    stopper.progressed = True
    assert stopper.seconds_left() == 400
    assert stopper.should_stop(next_work_seconds=339) is None
    assert stopper.should_stop(next_work_seconds=341) is not None
    with pytest.raises(SegmentEnd, match="deadline"):
        stopper.check(next_work_seconds=341)
    clock.now += 300  # 100 s left: a 39 s step still fits before the margin, a 41 s one not
    assert stopper.seconds_left() == 100
    assert stopper.should_stop(next_work_seconds=39) is None
    assert stopper.should_stop(next_work_seconds=41) is not None


def test_a_segment_that_has_done_nothing_yet_does_not_stop_for_its_deadline() -> None:
    stopper = _stopper(-10)  # loading took the whole budget
    assert stopper.should_stop() is None
    stopper.progressed = True  # the baseline was saved, or a step taken
    assert stopper.should_stop() is not None


def test_a_deadline_without_zone_is_utc() -> None:
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    naive = datetime(2026, 12, 1, 13, 0)
    stopper = Stopper(naive, now=now, clock=Clock())
    assert stopper.deadline is not None and stopper.deadline.tzinfo is UTC
    assert stopper.seconds_left() == 3600


def test_the_step_limit_ends_a_segment_after_that_many_steps_only_between_steps() -> None:
    stopper = _stopper(3600, max_steps=3)
    for _ in range(2):
        stopper.step_taken()
        assert stopper.should_stop_after_step(1.0) is None
    stopper.step_taken()
    assert stopper.should_stop_after_step(1.0) == (
        "took its 3 optimizer steps (the segment's step limit)"
    )
    # Not asked outside the training loop: the final evaluation of a run whose training
    # ended on the limit still runs.
    assert stopper.should_stop() is None


def test_the_deadline_still_applies_under_a_step_limit() -> None:
    clock = Clock()
    stopper = _stopper(400, clock, max_steps=100)
    stopper.step_taken()
    clock.now += 390
    assert stopper.should_stop_after_step(1.0) is not None
    assert "deadline" in (stopper.should_stop_after_step(1.0) or "")


def test_sigterm_asks_to_stop_and_the_old_handler_comes_back() -> None:
    stopper = Stopper(None)
    before = signal.getsignal(signal.SIGTERM)
    with stopper.handling_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        assert stopper.should_stop() == "received SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before
