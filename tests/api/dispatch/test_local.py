"""LocalDispatcher with real processes: a small stand-in trainer script (so these tests take
seconds; tests/test_loop.py runs the real trainer) started, watched, cancelled and killed."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr

from api.config import Settings
from api.dispatch import make_dispatcher
from api.dispatch.base import ExecutionStatus, Launch
from api.dispatch.local import LocalDispatcher
from trainer.contract.execution import ExecutionEnv
from trainer.contract.spec import RunSpec
from trainer.contract.spool import spool_file

FAKE_TRAINER = r"""
import json, os, signal, sys, time
mode, args = sys.argv[1], sys.argv[2:]
seen = {
    "argv": args,
    "env": {k: v for k, v in os.environ.items() if k.startswith(("TUNEPLANE_", "CUDA_", "OMP_"))},
    "cwd": os.getcwd(),
}
with open("seen.json", "w") as f:
    json.dump(seen, f)
# The handlers before "started": the tests send SIGTERM once they read that line.
if mode == "term":
    def saved(*_):
        print("fake trainer: SIGTERM, saving a checkpoint", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, saved)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("fake trainer: started", flush=True)
if mode == "ok":
    sys.exit(0)
if mode == "exit3":
    print("Traceback (most recent call last):\nValueError: no such data set", flush=True)
    sys.exit(3)
while True:
    time.sleep(0.05)
"""

# A Hub id: the stand-in reads no model, and a local path would have to lie under the roots.
SPEC = RunSpec(model_id="google/gemma-3-4b-it", dataset="digits", train_size=10, eval_size=5)
# Waits for a process to start or end are hang guards, not measurements: a loaded machine may
# take seconds to start a Python.
HANG_GUARD_S = 120.0


@pytest.fixture
def fake_trainer(tmp_path: Path) -> Path:
    path = tmp_path / "fake_trainer.py"
    path.write_text(FAKE_TRAINER)
    return path


@pytest.fixture
def dispatcher_for(
    make_settings: Callable[..., Settings], fake_trainer: Path
) -> Callable[..., LocalDispatcher]:
    made: list[LocalDispatcher] = []

    def _make(
        mode: str, grace_seconds: float = HANG_GUARD_S, **settings: object
    ) -> LocalDispatcher:
        # A trainer that stops on SIGTERM gets all the grace it could need, so that a slow
        # machine never turns its clean stop into a SIGKILL; only `stubborn` waits out a short one.
        d = LocalDispatcher(
            make_settings(**settings),
            trainer_command=[sys.executable, str(fake_trainer), mode],
            grace_seconds=grace_seconds,
        )
        made.append(d)
        return d

    yield _make  # type: ignore[misc]
    leave_nothing_running(made)


def leave_nothing_running(dispatchers: list[LocalDispatcher]) -> None:
    for d in dispatchers:
        for name in list(d._procs):
            pid = d.trainer_pid(name)
            if pid and d.status(name).state == "running":
                os.killpg(pid, signal.SIGKILL)
        d.close()


def launch(run_id: str = "run_abc", segment: int = 0) -> Launch:
    env = ExecutionEnv(
        run_id=run_id,
        callback_url=f"http://127.0.0.1:1/api/v1/runs/{run_id}/events",
        callback_token=SecretStr("tpr1.secret"),
        deadline=datetime.now(UTC) + timedelta(minutes=5),
        segment=segment,
    )
    return Launch(run_id=run_id, spec=SPEC, env=env)


def wait_for(d: LocalDispatcher, name: str, timeout: float = HANG_GUARD_S) -> ExecutionStatus:
    deadline = time.monotonic() + timeout
    while (status := d.status(name)).state == "running":
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} still running")
        time.sleep(0.05)
    return status


def wait_started(d: LocalDispatcher, name: str) -> int:
    deadline = time.monotonic() + HANG_GUARD_S
    while (pid := d.trainer_pid(name)) is None or not _log(d, name).count("started"):
        assert time.monotonic() < deadline, "the trainer did not start"
        time.sleep(0.05)
    return pid


def _log(d: LocalDispatcher, name: str) -> str:
    run_id, segment, _ = d.parse_name(name)
    return (d.settings.logs_dir / f"{run_id}-{segment}.log").read_text()


def test_the_trainer_gets_the_flags_and_exactly_the_execution_env(
    dispatcher_for: Callable[..., LocalDispatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The api's own settings must not reach the trainer.
    monkeypatch.setenv("TUNEPLANE_DATABASE_URL", "postgresql://secret@db/prod")
    monkeypatch.setenv("TUNEPLANE_CALLBACK_SIGNING_KEY", "do-not-leak")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the operator's choice wins
    d = dispatcher_for("ok", trainer_device="cpu")
    execution = d.start(launch(segment=2))
    assert execution.name.startswith("local:run_abc:2:")
    assert wait_for(d, execution.name) == ExecutionStatus("succeeded")

    run_dir = d.settings.runs_dir.resolve() / "run_abc"
    seen = json.loads((run_dir / "seen.json").read_text())
    assert seen["argv"] == [
        *SPEC.to_flags(), "--output-dir", str(run_dir / "output"), "--device", "cpu",
    ]  # fmt: skip
    assert RunSpec.from_flags(seen["argv"][:-4]) == SPEC
    expected = ExecutionEnv(
        run_id="run_abc",
        callback_url="http://127.0.0.1:1/api/v1/runs/run_abc/events",
        callback_token=SecretStr("tpr1.secret"),
        deadline=launch().env.deadline,
        segment=2,
        artifact_uri=str(run_dir / "output"),
        checkpoint_uri=str(run_dir / "checkpoints"),
        spool_dir=str(d.spool_dir()),
    ).as_environ()
    got = {k: v for k, v in seen["env"].items() if k != "TUNEPLANE_DEADLINE"}
    assert got == {k: v for k, v in expected.items() if k != "TUNEPLANE_DEADLINE"} | {
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "3",
    }
    assert seen["cwd"] == str(run_dir)
    assert execution.artifact_uri == str(run_dir / "output")
    assert execution.log_uri == (d.settings.logs_dir.resolve() / "run_abc-2.log").as_uri()
    assert "fake trainer: started" in _log(d, execution.name)


def test_the_trainer_gets_the_configured_device(
    dispatcher_for: Callable[..., LocalDispatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    # `cuda` makes a trainer without a GPU fail instead of training on the CPU (as Cloud Run's).
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    d = dispatcher_for("ok", trainer_device="cuda")
    assert wait_for(d, d.start(launch()).name) == ExecutionStatus("succeeded")
    seen = json.loads((d.settings.runs_dir.resolve() / "run_abc" / "seen.json").read_text())
    assert seen["argv"][-2:] == ["--device", "cuda"]
    assert "CUDA_VISIBLE_DEVICES" not in seen["env"]


def test_concurrent_trainers_share_the_cores(
    dispatcher_for: Callable[..., LocalDispatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without an OMP_NUM_THREADS of the operator's, each trainer gets its share of the cores.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3, 4, 5, 6})
    for concurrency, threads in [(1, "7"), (2, "3"), (3, "2"), (8, "1")]:
        d = dispatcher_for("ok", max_concurrency=concurrency)
        assert wait_for(d, d.start(launch()).name) == ExecutionStatus("succeeded")
        seen = json.loads((d.settings.runs_dir.resolve() / "run_abc" / "seen.json").read_text())
        assert seen["env"]["OMP_NUM_THREADS"] == threads, concurrency


def test_a_failing_trainer_reports_its_exit_code_and_log_tail(
    dispatcher_for: Callable[..., LocalDispatcher],
) -> None:
    d = dispatcher_for("exit3")
    name = d.start(launch()).name
    status = wait_for(d, name)
    assert status.state == "failed"
    assert status.message is not None
    assert status.message.startswith("the trainer exited with code 3; last lines of its log")
    assert "ValueError: no such data set" in status.message


def test_sigkill_is_named_and_survives_an_api_restart(
    dispatcher_for: Callable[..., LocalDispatcher],
) -> None:
    d = dispatcher_for("sleep")
    name = d.start(launch()).name
    trainer = wait_started(d, name)
    # A new dispatcher (an api restart) knows the execution only by its name and files.
    again = LocalDispatcher(d.settings)
    assert again.status(name).state == "running"
    os.kill(trainer, signal.SIGKILL)  # the kernel's OOM killer, say
    status = wait_for(again, name)
    assert status.state == "failed"
    assert status.message is not None and "killed by SIGKILL (exit code -9)" in status.message
    assert "fake trainer: started" in status.message


def test_a_supervisor_gone_without_an_exit_code_fails(
    dispatcher_for: Callable[..., LocalDispatcher],
) -> None:
    d = dispatcher_for("sleep")
    name = d.start(launch()).name
    trainer = wait_started(d, name)
    _, _, supervisor = d.parse_name(name)
    os.kill(supervisor, signal.SIGKILL)  # first, so it cannot record the trainer's end
    os.killpg(trainer, signal.SIGKILL)
    d._procs[name].wait()
    status = LocalDispatcher(d.settings).status(name)  # no Popen: from /proc and the files
    assert status.state == "failed"
    assert "without recording an exit code" in (status.message or "")


def test_cancel_sends_sigterm_and_the_trainer_stops_cleanly(
    dispatcher_for: Callable[..., LocalDispatcher],
) -> None:
    d = dispatcher_for("term")
    name = d.start(launch()).name
    wait_started(d, name)
    d.cancel(name)
    status = wait_for(d, name)
    assert status == ExecutionStatus("cancelled", "the trainer exited with code 0")
    assert "SIGTERM, saving a checkpoint" in _log(d, name)


def test_cancel_kills_a_trainer_that_ignores_sigterm(
    dispatcher_for: Callable[..., LocalDispatcher],
) -> None:
    d = dispatcher_for("stubborn", grace_seconds=0.5)
    name = d.start(launch()).name
    wait_started(d, name)
    started = time.monotonic()
    d.cancel(name)
    d.cancel(name)  # asking again changes nothing
    status = wait_for(d, name)
    assert time.monotonic() - started >= 0.45  # the grace period
    assert status.state == "cancelled"
    assert "SIGKILL" in (status.message or "")


def test_a_missing_trainer_command_fails_with_127(
    make_settings: Callable[..., Settings],
) -> None:
    d = LocalDispatcher(make_settings(), trainer_command=["/nonexistent/python"])
    name = d.start(launch()).name
    status = wait_for(d, name)
    assert status.state == "failed"
    assert "could not be started" in (status.message or "")
    assert "/nonexistent/python" in (status.message or "")


def test_leftover_events_are_read_from_the_runs_spool(
    make_settings: Callable[..., Settings],
) -> None:
    d = LocalDispatcher(make_settings())
    name = "local:run_abc:0:1"
    assert d.leftover_events(name) == []
    path = spool_file(d.spool_dir(), "run_abc")
    path.parent.mkdir(parents=True)
    path.write_text('{"a": 1}\n\n{"b": 2}\n')
    assert d.leftover_events(name) == ['{"a": 1}', '{"b": 2}']
    d.clear_leftover_events(name)
    assert not path.exists()


def test_names_and_factory(make_settings: Callable[..., Settings]) -> None:
    assert isinstance(make_dispatcher(make_settings()), LocalDispatcher)
    assert LocalDispatcher.parse_name("local:run_1:3:42") == ("run_1", 3, 42)
    assert LocalDispatcher.parse_name("local:run_1:3:42:abc") == ("run_1", 3, 42)
    d = LocalDispatcher(make_settings())
    assert d.status("projects/p/executions/e").state == "unknown"
    with pytest.raises(ValueError, match="not a local execution"):
        d.cancel("local:nope")


def _state(pid: int) -> str | None:
    """The process's state letter from /proc (`Z`: a zombie nobody reaped), None once gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_finished_trainers_leave_no_zombie_even_unasked(
    dispatcher_for: Callable[..., LocalDispatcher],
) -> None:
    """The worker often learns that a run ended from the trainer's events and never asks
    `status` again: the supervisor must be reaped all the same."""
    d = dispatcher_for("ok")
    names = [d.start(launch(run_id=f"run_z{i}")).name for i in range(3)]
    for name in names:
        run_id, segment, supervisor = d.parse_name(name)
        exit_file = d.settings.logs_dir / f"{run_id}-{segment}.exit"
        deadline = time.monotonic() + 60  # a guard against a hang, not the thing under test
        while _state(supervisor) is not None:
            # Once it has written its exit code, the supervisor only has to exit: being
            # reaped is what takes its /proc entry away.
            assert time.monotonic() < deadline, (
                f"supervisor {supervisor} is {_state(supervisor)!r} "
                f"{'after writing its exit code' if exit_file.exists() else ''}"
            )
            time.sleep(0.05)
        assert exit_file.read_text() == "0"


def test_an_execution_belongs_to_the_data_directory_that_started_it(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    d = LocalDispatcher(make_settings())
    again = LocalDispatcher(make_settings())  # a restart: the same directory, the same owner
    other = LocalDispatcher(make_settings(data_dir=tmp_path / "other"))
    assert d.owner == again.owner != other.owner
    assert (d.settings.data_dir / "dispatcher.id").read_text() == d.owner
    name = f"local:run_1:0:42:{d.owner}"
    assert d.owns(name) and again.owns(name) and not other.owns(name)
    # Named before owners were: every local dispatcher's, as they were then.
    assert d.owns("local:run_1:0:42") and other.owns("local:run_1:0:42")
    assert not d.owns("projects/p/locations/r/jobs/j/executions/e")


def test_interrupt_sends_sigterm_and_marks_no_cancel(
    dispatcher_for: Callable[..., LocalDispatcher],
) -> None:
    """Stopping the service: the trainer saves and stops, and its execution ends as succeeded
    (its run moves on by its `segment_done`), not as cancelled."""
    d = dispatcher_for("term")
    name = d.start(launch()).name
    assert d.owns(name)
    wait_started(d, name)
    d.interrupt(name)
    assert wait_for(d, name) == ExecutionStatus("succeeded")
    assert "SIGTERM, saving a checkpoint" in _log(d, name)
