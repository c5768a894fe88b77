"""Stopping `tuneplane serve` (SIGTERM, as systemd or `docker stop` does) with a local run
training: by default its trainer gets SIGTERM first, saves a checkpoint and reports its segment
done while the server still listens; serve exits with no trainer left behind, the run is queued
for its next segment, and the next start resumes it from that checkpoint. (`keep`, the other
choice of TUNEPLANE_LOCAL_TRAINERS_ON_STOP, is tests/faults/test_api_restart.py.)"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine

from api.db import session_scope
from api.runs.models import Run
from tests.faults.serve import Serve, stored_events, trainer_processes
from trainer.contract.spool import spool_file

pytestmark = pytest.mark.slow


def test_stopping_serve_checkpoints_its_trainer_and_the_next_start_resumes_it(
    db_url: str, engine: Engine, tmp_path: Path, tiny_model: Path
) -> None:
    serve = Serve(tmp_path / "data", db_url)
    try:
        run_id = serve.start_training(tiny_model)
        logs = serve.data_dir / "logs"
        asked = time.monotonic()
        assert serve.kill(signal.SIGTERM) in (0, -signal.SIGTERM), serve.output()
        stopped = time.monotonic() - asked
        # serve waited for its trainer: it stopped by itself (exit 0), with nothing left, and
        # every event of it arrived while the server still listened (nothing was spooled).
        assert (logs / f"{run_id}-0.exit").read_text() == "0"
        assert not spool_file(serve.data_dir / "spool", run_id).exists()
        with session_scope(engine) as s:
            queued = s.get(Run, run_id)
            assert queued is not None
            assert (queued.status, queued.segment) == ("queued", 1), queued.status_reason
            assert queued.claimed_by is None
        (done,) = [e.data for e in stored_events(db_url, run_id) if e.type == "segment_done"]
        assert 1 <= done["step"] < 80 and done["checkpoint_uri"] == queued.checkpoint_uri
        assert Path(done["checkpoint_uri"], "manifest.json").is_file()

        serve.start()
        run = serve.wait(run_id, lambda r: False, "the run ended")
    finally:
        serve.close()
    assert run["status"] == "succeeded", (run["status_reason"], serve.output())
    assert run["last_step"] == 80
    events = stored_events(db_url, run_id)
    started = [e.data for e in events if e.type == "started"]
    assert [s["segment"] for s in started] == [0, 1]
    assert started[1]["resumed_from_step"] == done["step"]  # not from the beginning
    for segment in (0, 1):
        seqs = [e.seq for e in events if e.segment == segment]
        first = segment * 1_000_000  # trainer.report.EventLog numbers each segment from here
        assert seqs == list(range(first, first + len(seqs)))  # no gap, no duplicate
        assert trainer_processes(logs / f"{run_id}-{segment}.log") == 1
    print(
        f"\n[figure] SIGTERM to serve's exit, its trainer checkpointed at step {done['step']} "
        f"and stopped: {stopped:.1f} s"
    )
