"""Every (from, to) pair of run states against the table docs/architecture.md's "Run states"
implies."""

from __future__ import annotations

import itertools

import pytest
from sqlalchemy import Engine

from api.db import session_scope
from api.runs.finish import finish_run
from api.runs.models import Run
from api.runs.states import ALLOWED, TERMINAL, IllegalTransition, RunStatus, check_transition
from api.runs.status import set_status

S = RunStatus
# Written out by hand, not derived from api/runs/states.py: this is what the code is checked
# against.
EXPECTED: dict[RunStatus, set[RunStatus]] = {
    S.queued: {S.dispatched, S.cancelled, S.failed},
    S.dispatched: {S.running, S.queued, S.cancelling, S.succeeded, S.failed},
    S.running: {S.queued, S.cancelling, S.succeeded, S.failed},
    S.cancelling: {S.cancelled, S.succeeded, S.failed},
    S.succeeded: set(),
    S.failed: set(),
    S.cancelled: set(),
}
PAIRS = list(itertools.product(RunStatus, RunStatus))


def test_the_table_covers_every_state() -> None:
    assert set(EXPECTED) == set(RunStatus) == set(ALLOWED)
    assert {s for s, nxt in EXPECTED.items() if not nxt} == set(TERMINAL)


@pytest.mark.parametrize(("current", "new"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_transition(current: RunStatus, new: RunStatus) -> None:
    if new in EXPECTED[current]:
        assert check_transition(current, new) is new
        assert check_transition(current.value, new.value) is new
    else:
        with pytest.raises(IllegalTransition) as caught:
            check_transition(current, new)
        assert (caught.value.current, caught.value.new) == (current, new)
        assert f"a {current} run cannot become {new}" in str(caught.value)
        if current in TERMINAL:
            assert "it is final" in str(caught.value)


def test_unknown_state_is_refused() -> None:
    with pytest.raises(ValueError):
        check_transition("queued", "paused")


def test_set_status_keeps_timestamps_and_refuses_illegal_moves(engine: Engine) -> None:
    with session_scope(engine) as s:
        run = Run(spec={}, model_id="m", dataset="digits", gpu_type="nvidia-l4")
        s.add(run)
        s.commit()
        set_status(s, run, S.dispatched)
        assert run.started_at is None and run.finished_at is None
        set_status(s, run, S.running)
        started = run.started_at
        assert started is not None
        set_status(s, run, S.queued)  # between segments
        set_status(s, run, S.dispatched)
        set_status(s, run, S.running)
        assert run.started_at == started  # the first start is kept across segments
        finish_run(s, run, S.succeeded, reason="done")
        assert run.finished_at is not None and run.status_reason == "done"
        s.commit()
        with pytest.raises(IllegalTransition):
            set_status(s, run, S.running)
        assert run.status == S.succeeded


def test_an_end_goes_through_finish_run_and_only_an_end(engine: Engine) -> None:
    # set_status cannot end a run (its gate and webhooks would be skipped); finish_run ends only.
    with session_scope(engine) as s:
        run = Run(spec={}, model_id="m", dataset="digits", gpu_type="nvidia-l4")
        s.add(run)
        s.commit()
        with pytest.raises(ValueError, match="finish_run"):
            set_status(s, run, S.cancelled)
        with pytest.raises(ValueError, match="not an end"):
            finish_run(s, run, S.dispatched)
        assert run.status == S.queued and run.finished_at is None
        finish_run(s, run, S.cancelled, "no longer wanted")
        assert run.status == S.cancelled and run.finished_at is not None
        # Not from a template: the end still records that there is no gate to apply.
        assert run.gate_status == "not_applicable"
