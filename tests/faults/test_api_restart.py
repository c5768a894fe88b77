"""`tuneplane serve` gone while its local run trains, then started again on the same port, data
directory and database: the run finishes, its event log has no gap and no duplicate (what the
trainer could not deliver waited in its spool), and exactly one trainer process ran.

Gone two ways: SIGKILLed (a crash: nothing is stopped, the trainer runs on under init), and
stopped with SIGTERM under `TUNEPLANE_LOCAL_TRAINERS_ON_STOP=keep` (the trainers are left to
train on, and the next start takes them back). The default, a checkpoint and a stop, is
tests/faults/test_serve_stop.py."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.faults.serve import Serve, stored_events, trainer_processes
from tests.runs_client import wait_until
from trainer.contract.spool import spool_file

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("sig", "on_stop"),
    [(signal.SIGKILL, "checkpoint"), (signal.SIGTERM, "keep")],
    ids=["sigkill", "sigterm-keep"],
)
def test_an_api_gone_mid_training_comes_back_and_its_run_finishes_once(
    db_url: str, tmp_path: Path, tiny_model: Path, sig: int, on_stop: str
) -> None:
    serve = Serve(tmp_path / "data", db_url, local_trainers_on_stop=on_stop)
    try:
        run_id = serve.start_training(tiny_model)
        logs = serve.data_dir / "logs"
        code = serve.kill(sig)
        assert code in (-sig, 0), (code, serve.output())
        killed_at = time.monotonic()
        # The trainer outlived the api, still training: not done, its exit not recorded.
        assert not (logs / f"{run_id}-0.exit").exists(), "the trainer ended before the api"
        before = stored_events(db_url, run_id)
        assert "completed" not in {e.type for e in before}

        # With the api away, the trainer keeps its events in the spool; then the api returns.
        spool = spool_file(serve.data_dir / "spool", run_id)
        wait_until(spool.exists, "the trainer never spooled an event")
        serve.start()
        restarted_at = time.monotonic()
        run = serve.wait(run_id, lambda r: False, "the run ended")
        finished_at = time.monotonic()
        wait_until(lambda: not spool.exists(), "the spool was never emptied")
    finally:
        serve.close()
    assert run["status"] == "succeeded", (run["status_reason"], serve.output())
    assert run["last_step"] == run["total_steps"] == 80

    events = stored_events(db_url, run_id)
    assert [e.seq for e in events] == list(range(len(events)))  # no gap, no duplicate
    assert len({e.id for e in events}) == len(events)
    assert [e.type for e in events].count("started") == 1
    assert events[-1].type == "completed"
    assert len(events) > len(before)  # the rest came after the restart, from the spool on
    # One trainer: one start by the dispatcher, one trainer process in the segment's log.
    log = logs / f"{run_id}-0.log"
    assert log.read_text().count("] segment 0: ") == 1
    assert trainer_processes(log) == 1
    print(
        f"\n[figure] {sig=!s} on_stop={on_stop}: down {restarted_at - killed_at:.1f} s; run "
        f"finished {finished_at - restarted_at:.1f} s after the restart was ready; "
        f"{len(before)} events before, {len(events) - len(before)} after, none lost"
    )
