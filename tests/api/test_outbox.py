"""The outbox's claim (api/outbox.py), on real databases: a due row is leased to one drainer at
a time, and a lease that runs out (its drainer died) frees the row again."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine, update

from api.db import session_scope, utcnow
from api.dispatch.models import ExecutionStop
from api.outbox import backoff, claim_due
from tests.api.factories import insert_runs

LEASE = timedelta(minutes=2)


def test_a_due_row_is_leased_to_one_drainer_until_its_lease_runs_out(engine: Engine) -> None:
    (run_id,) = insert_runs(engine)
    now = utcnow()
    with session_scope(engine) as s:
        for name, due in (("due", now), ("later", now + timedelta(hours=1))):
            s.add(
                ExecutionStop(
                    id=f"stp_{name}",
                    run_id=run_id,
                    execution_name=name,
                    reason="test",
                    exits_by_itself=False,
                    next_attempt_at=due,
                )
            )
        s.commit()
    assert claim_due(engine, ExecutionStop, LEASE, limit=10) == ["stp_due"]
    assert claim_due(engine, ExecutionStop, LEASE, limit=10) == []  # leased: not again
    with session_scope(engine) as s:  # its drainer died; the lease runs out
        s.execute(update(ExecutionStop).values(claimed_until=utcnow() - timedelta(seconds=1)))
        s.commit()
    assert claim_due(engine, ExecutionStop, LEASE, limit=10) == ["stp_due"]


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [backoff(n, 5, 30).total_seconds() for n in (1, 2, 3, 4)] == [5, 10, 20, 30]
