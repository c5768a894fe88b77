"""When a segment stops: margins before the deadline, and SIGTERM."""

from __future__ import annotations

import os
import signal
from datetime import UTC, datetime, timedelta

import pytest

from trainer.deadline import SegmentEnd, Stopper


def _stopper(seconds: float) -> Stopper:
    now = datetime.now(UTC)
    return Stopper(now + timedelta(seconds=seconds), now=now)


def test_no_deadline_never_stops() -> None:
    stopper = Stopper(None)
    assert stopper.should_stop(next_work_seconds=1e9) is None


def test_margin_is_a_minute_or_twice_the_last_save_within_a_quarter_of_the_budget() -> None:
    long = _stopper(3600)
    assert long.margin() == 60
    long.save_seconds = 45
    assert long.margin() == 90
    short = _stopper(100)
    assert short.margin() == pytest.approx(25, abs=0.01)


def test_stops_when_the_next_step_would_eat_into_the_margin() -> None:
    stopper = _stopper(400)  # margin 60 s
    stopper.progressed = True
    assert stopper.should_stop(next_work_seconds=300) is None
    assert stopper.should_stop(next_work_seconds=345) is not None
    with pytest.raises(SegmentEnd, match="deadline"):
        stopper.check(next_work_seconds=345)


def test_a_segment_that_has_done_nothing_yet_does_not_stop_for_its_deadline() -> None:
    stopper = _stopper(-10)  # loading took the whole budget
    assert stopper.should_stop() is None
    stopper.progressed = True  # the baseline was saved, or a step taken
    assert stopper.should_stop() is not None


def test_a_deadline_without_zone_is_utc() -> None:
    naive = datetime.now(UTC).replace(tzinfo=None) + timedelta(hours=1)
    stopper = Stopper(naive)
    assert stopper.deadline is not None and stopper.deadline.tzinfo is UTC
    assert 3500 < stopper.seconds_left() <= 3600


def test_sigterm_asks_to_stop_and_the_old_handler_comes_back() -> None:
    stopper = Stopper(None)
    before = signal.getsignal(signal.SIGTERM)
    with stopper.handling_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        assert stopper.should_stop() == "received SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before
