"""A checkpoint save cut short (the process killed mid-save: no manifest yet, or a file written
only in part): the next segment resumes from the newest checkpoint that is whole, and trains the
steps after it. The real trainer (`python -m trainer`, the tiny Gemma 3) on real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from trainer.checkpoints import MANIFEST, dir_name
from trainer.contract.events import Event, parse_event

pytestmark = pytest.mark.slow

STEPS = 6  # 48 samples, batch 8
FLAGS = [
    *("--dataset", "digits", "--train-size", "48", "--eval-size", "10", "--num-epochs", "1"),
    *("--learning-rate", "3e-3", "--batch-size", "8", "--gradient-accumulation-steps", "1"),
    *("--eval-batch-size", "10", "--max-new-tokens", "3", "--save-steps", "1"),
]


def _segment(tiny_model: Path, tmp_path: Path, segment: int, **env: str) -> tuple[list[Event], str]:
    events_file = tmp_path / f"events-{segment}.jsonl"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TUNEPLANE_")}
    environ.update(
        TUNEPLANE_RUN_ID="run-torn",
        TUNEPLANE_SEGMENT=str(segment),
        TUNEPLANE_CHECKPOINT_URI=str(tmp_path / "ckpts"),
        # A deadline that never comes: the step limit, not the clock, ends the first segment.
        TUNEPLANE_DEADLINE=(datetime.now(UTC) + timedelta(days=1)).isoformat(),
        OMP_NUM_THREADS="1",
        **env,
    )
    command = [sys.executable, "-m", "trainer", "--model-id", str(tiny_model), *FLAGS]
    command += ["--output-dir", str(tmp_path / "out"), "--device", "cpu"]
    done = subprocess.run(
        [*command, "--events-file", str(events_file)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [parse_event(line) for line in events_file.read_text().splitlines()], done.stderr


def _of(events: list[Event], kind: str) -> list[Any]:
    return [e.data for e in events if e.type == kind]


def test_resume_takes_the_newest_complete_checkpoint(tiny_model: Path, tmp_path: Path) -> None:
    first, _ = _segment(tiny_model, tmp_path, 0, TUNEPLANE_SEGMENT_MAX_STEPS="3")
    (done,) = _of(first, "segment_done")
    assert done.step == 3
    ckpts = tmp_path / "ckpts"
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == [dir_name(2), dir_name(3)]

    # Step 4's save was cut before its manifest: every file there, the manifest not.
    torn = ckpts / dir_name(4)
    shutil.copytree(ckpts / dir_name(3), torn)
    (torn / MANIFEST).unlink()
    # Step 3's biggest file was cut mid-write (its manifest is there: a file replaced later).
    manifest = json.loads((ckpts / dir_name(3) / MANIFEST).read_text())
    biggest = max(manifest["files"], key=lambda name: manifest["files"][name]["size"])
    path = ckpts / dir_name(3) / biggest
    path.write_bytes(path.read_bytes()[: manifest["files"][biggest]["size"] // 2])

    second, stderr = _segment(tiny_model, tmp_path, 1)
    assert second[0].type == "started" and second[0].data.resumed_from_step == 2
    assert f"ignoring checkpoint {torn}: no manifest (an interrupted save)" in stderr, stderr
    assert f"ignoring checkpoint {ckpts / dir_name(3)}: {biggest} has " in stderr, stderr
    # Steps 3 to 6 trained once more from step 2's state, and the run completed.
    assert [p.step for p in _of(second, "progress")] == list(range(3, STEPS + 1))
    assert second[-1].type == "completed" and second[-1].data.step == STEPS
