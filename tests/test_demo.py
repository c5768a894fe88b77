"""`tuneplane demo` as a person runs it: a subprocess, from an empty data directory."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from api.cli.demo_run import DEMO_SPEC
from api.db import make_engine, session_scope
from api.runs.models import Run
from api.runs.states import duration_seconds
from api.wording import secs
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def demo(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    # The user's own TUNEPLANE_* settings must not steer the test (the demo sets what it needs).
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEPLANE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "api", "demo", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Ctrl-C, as a person would: the demo cancels its run, so no trainer is left behind.
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"the demo took over {timeout:.0f} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.slow
def test_demo_exit_runs_green_and_the_model_learns(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    port = free_port()
    started = time.monotonic()
    result = demo("--exit", "--data-dir", str(data_dir), "--port", str(port), timeout=600)
    seconds = time.monotonic() - started
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "building the tiny offline Gemma 3" in out
    assert (data_dir / "models" / "tiny-gemma3" / "config.json").is_file()
    ran = re.search(r"^run (run_\w+) succeeded: ran (.+)$", out, re.M)
    assert ran, out
    # Every phase once, in order; the training bar (one line per tenth of the steps, as the
    # output is not a terminal) is labelled training, and its last line comes before final_eval.
    lines = out.splitlines()
    phases = [line for line in lines if line.startswith("phase: ")]
    assert phases == [
        f"phase: {p}" for p in ("loading", "baseline_eval", "training", "final_eval", "uploading")
    ], out
    bars = [i for i, line in enumerate(lines) if "[" in line and " steps" in line]
    assert bars and all(lines[i].startswith("  training [") for i in bars), out
    assert lines.index("phase: training") < bars[0]
    assert lines[bars[-1]].split("] ")[1].startswith("352/352 steps"), out
    assert bars[-1] < lines.index("phase: final_eval"), out
    # The duration is the run's own, as its page shows it (api/runs/states.py duration_seconds).
    engine = make_engine(f"sqlite:///{data_dir / 'tuneplane.db'}")
    with session_scope(engine) as session:
        stored = session.get(Run, ran[1])
        assert stored is not None
        shown = secs(duration_seconds(stored))
    engine.dispose()
    assert ran[2] == shown, out
    figures = {
        m["stage"]: (float(m["acc"]), float(m["f1"]))
        for m in re.finditer(
            r"^\s+(?P<stage>baseline|final)\s+(?P<acc>[\d.]+)\s+(?P<f1>[\d.]+)$", out, re.M
        )
    }
    assert set(figures) == {"baseline", "final"}, out
    (base_acc, _), (final_acc, final_f1) = figures["baseline"], figures["final"]
    # README quotes this run's figures with the versions of trainer/constraints.txt. On one
    # machine they come out the same every time (tests/trainer/test_cli.py checks it bit for
    # bit), but not on every CPU: the float kernels torch picks (AVX2 or AVX-512) round
    # differently, and 352 steps carry the difference into the result (0.872 and 0.844 on two
    # 2-core EPYC VMs). So the figure must hold to within 0.05, not to the last digit.
    readme = (ROOT / "README.md").read_text()
    quoted = re.search(r"^  final\s+([\d.]+)\s+([\d.]+)$", readme, re.M)
    assert quoted, "README's demo figures moved"
    assert abs(float(quoted[1]) - final_acc) <= 0.05, out
    assert abs(float(quoted[2]) - final_f1) <= 0.05, out
    # Ten classes: chance is 0.1. The tiny model must learn, not just run.
    assert final_acc >= 0.3 and final_acc > base_acc and final_f1 > 0.2, out
    link = re.search(rf"Dashboard: http://127\.0\.0\.1:{port}/runs/(run_\w+)", out)
    assert link, out
    # The demo's sizes exist in the data set: it trains on what README says, with no warning.
    results = json.loads((data_dir / "runs" / link[1] / "output" / "results.json").read_text())
    used = results["data"]
    assert used["train_samples"] == used["train_size_requested"] == DEMO_SPEC["train_size"]
    assert used["eval_samples"] == used["eval_size_requested"] == DEMO_SPEC["eval_size"]
    assert used["warnings"] == []
    # How long it took is reported, never asserted: a slow or loaded machine is no failure
    # (README quotes the figure measured on an idle one). The 600 s above only guards a hang.
    print(f"demo: {seconds:.0f} s, baseline {figures['baseline']}, final {figures['final']}")


def test_a_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = demo("--data-dir", str(tmp_path / "d"), "--port", str(port))
    assert result.returncode == 2
    assert one_line(result) == (
        f"tuneplane demo: port {port} is already in use (another server?); "
        "choose another with --port"
    )


def test_a_second_demo_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    with (data_dir / "demo.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running demo holds it
        held.write("4242")
        held.flush()
        result = demo("--data-dir", str(data_dir), "--port", str(free_port()))
    assert result.returncode == 2
    line = one_line(result)
    assert "another demo (pid 4242) is using" in line and str(data_dir) in line


def test_a_read_only_data_dir_is_one_clear_line(tmp_path: Path) -> None:
    with read_only_dir(tmp_path / "ro") as data_dir:
        result = demo("--data-dir", str(data_dir / "demo"), "--port", str(free_port()))
    assert result.returncode == 2
    line = one_line(result)
    assert line.startswith(f"tuneplane demo: cannot write to the data directory {data_dir}")
    assert line.endswith("choose a writable one with --data-dir")


@contextmanager
def read_only_dir(path: Path) -> Iterator[Path]:
    """A directory nobody may write to. Permission bits do not stop root, so as root the
    directory is made immutable (chattr) or a read-only tmpfs is mounted on it."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    if shutil.which("chattr") and _run("chattr", "+i", str(path)):
        try:
            yield path
        finally:
            _run("chattr", "-i", str(path))
        return
    if _run("mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)):
        try:
            yield path
        finally:
            _run("umount", str(path))
        return
    pytest.skip("running as root, and neither chattr nor a read-only mount works here")


def _run(*cmd: str) -> bool:
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0
