"""LocalDispatcher: each execution is a `python -m trainer` process on this machine.

The trainer gets exactly what a Cloud Run execution gets: the spec's flags plus `--output-dir`
and `--device` (here `settings.trainer_device`; Cloud Run passes `cuda`, so that a task without
a GPU fails instead of training on its CPU), and the `TUNEPLANE_*` variables of
`ExecutionEnv.as_environ()` (none of the api's own `TUNEPLANE_*` settings, such as the database
URL or the signing key, leak into it).

Each trainer runs under a small supervisor (plain Python; api/dispatch/local_supervisor.py) in a
session of its own, so it outlives an api restart and a Ctrl-C in the api's terminal. It writes the
trainer's pid to `<run>-<segment>.pid` and, when the trainer ends, its exit code to
`<run>-<segment>.exit`, both next to the log in `settings.logs_dir`. The execution's name,
`local:<run>:<segment>:<supervisor pid>:<owner>`, plus those files, are all `status` needs: an
api restarted while a trainer ran still learns how it ended, including a SIGKILL (exit code -9).

The owner is the id of the data directory (`DATA_DIR/dispatcher.id`, made once): only a
dispatcher on that directory can see the trainer's files, so only it judges the execution
(`owns`). Replicas with data directories of their own, on one database, each watch their own
trainers; without it, each failed the others' live runs as "supervisor gone", and freed their
slots under `max_concurrency` while the trainers ran on. Names of four parts (written before
owners) count as every dispatcher's, as they did.

Before each start the spec's local paths are checked against TUNEPLANE_LOCAL_DATA_ROOTS again
(api/runs/local_paths.py): the trainer runs as the server's user and reads what they name.

Cancel: SIGTERM to the trainer (it saves a checkpoint and stops, as on Cloud Run), then SIGKILL
to its process group after `grace_seconds`. `interrupt` (stopping the service) sends the SIGTERM
alone and marks nothing: the trainer's segment ends with a checkpoint and its run is queued for
the next segment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from api.config import Settings
from api.dispatch.base import DispatchError, Execution, ExecutionStatus, Launch
from api.dispatch.local_supervisor import SUPERVISOR, describe_exit, log_tail, owner_id
from api.runs.local_paths import LocalPaths
from trainer.contract.execution import PREFIX, ExecutionEnv
from trainer.contract.spool import spool_file

log = logging.getLogger(__name__)

NAME_PREFIX = "local"


def threads_per_trainer(settings: Settings) -> int:
    """This process's cores divided among the trainers that may run at once."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // settings.max_concurrency)


class LocalDispatcher:
    def __init__(
        self,
        settings: Settings,
        *,
        trainer_command: Sequence[str] | None = None,
        grace_seconds: float = 10.0,
    ) -> None:
        self.settings = settings
        # What runs the trainer; the spec's flags and --output-dir are appended.
        self.trainer_command = list(
            trainer_command or [settings.trainer_python or sys.executable, "-m", "trainer"]
        )
        self.grace_seconds = grace_seconds
        self.owner = owner_id(settings.data_dir)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._kill_timers: dict[str, threading.Timer] = {}
        self._lock = threading.Lock()

    # -- files of one execution ------------------------------------------------------------

    def _paths(self, run_id: str, segment: int) -> dict[str, Path]:
        base = self.settings.logs_dir.resolve() / f"{run_id}-{segment}"
        return {
            "log": base.with_suffix(".log"),
            "exit": base.with_suffix(".exit"),
            "pid": base.with_suffix(".pid"),
            "cancel": base.with_suffix(".cancel"),
        }

    def spool_dir(self) -> Path:
        return self.settings.data_dir.resolve() / "spool"

    @staticmethod
    def parse_name(name: str) -> tuple[str, int, int]:
        """(run id, segment, supervisor pid) of a `local:<run>:<segment>:<pid>[:<owner>]` name."""
        parts = name.split(":")
        if len(parts) not in (4, 5) or parts[0] != NAME_PREFIX:
            raise ValueError(f"not a local execution name: {name!r}")
        return parts[1], int(parts[2]), int(parts[3])

    def owns(self, execution_name: str) -> bool:
        """Whether this dispatcher's data directory holds the execution's files (see above)."""
        parts = execution_name.split(":")
        if parts[0] != NAME_PREFIX:
            return False
        return len(parts) == 4 or parts[4:] == [self.owner]

    # -- Dispatcher ------------------------------------------------------------------------

    def start(self, launch: Launch) -> Execution:
        run_id, segment = launch.run_id, launch.env.segment
        # Checked at creation too, but the roots may have been narrowed since (a restart with
        # new settings) while the run waited in the queue or between segments.
        refused = LocalPaths.of(self.settings).refusal(launch.spec)
        if refused is not None:
            field, message = refused
            raise DispatchError("permanent", f"spec.{field}: {message}")
        paths = self._paths(run_id, segment)
        run_dir = self.settings.runs_dir.resolve() / run_id
        output_dir, checkpoint_dir = run_dir / "output", run_dir / "checkpoints"
        log_file = self._prepare(paths, run_dir, output_dir, checkpoint_dir)
        env = launch.env.model_copy(
            update={
                "run_id": run_id,
                "artifact_uri": str(output_dir),
                "checkpoint_uri": str(checkpoint_dir),
                "spool_dir": str(self.spool_dir()),
            }
        )
        command = [
            *self.trainer_command,
            *launch.spec.to_flags(),
            "--output-dir",
            str(output_dir),
            "--device",
            self.settings.trainer_device,
        ]
        with log_file:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log_file.write(f"[tuneplane {stamp}] segment {segment}: {' '.join(command)}\n".encode())
            log_file.flush()
            proc = self._spawn(paths, command, self._environ(env), run_dir, log_file)
        name = f"{NAME_PREFIX}:{run_id}:{segment}:{proc.pid}:{self.owner}"
        with self._lock:
            self._procs[name] = proc
        # Reap the supervisor the moment it exits. The worker often learns that a run ended
        # from the trainer's own events and never asks `status` again, which left one
        # `<defunct>` process per finished run behind.
        threading.Thread(target=proc.wait, name=f"reap-{name}", daemon=True).start()
        return Execution(
            name=name,
            log_uri=paths["log"].as_uri(),
            artifact_uri=str(output_dir),
            checkpoint_uri=str(checkpoint_dir),
        )

    def _prepare(
        self, paths: dict[str, Path], run_dir: Path, output_dir: Path, checkpoint_dir: Path
    ) -> BinaryIO:
        """Make the run's folders and open its log; a folder it cannot make fails the run."""
        try:
            for d in (paths["log"].parent, output_dir, checkpoint_dir, self.spool_dir()):
                d.mkdir(parents=True, exist_ok=True)
            # Files of an earlier attempt at this segment would make this one look finished.
            for key in ("exit", "pid", "cancel"):
                paths[key].unlink(missing_ok=True)
            return paths["log"].open("ab")
        except OSError as exc:
            raise DispatchError(
                "permanent", f"cannot prepare {run_dir} or {paths['log'].parent}: {exc}"
            ) from exc

    def _environ(self, env: ExecutionEnv) -> dict[str, str]:
        """The process environment minus the api's own settings, plus the execution's contract."""
        environ = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
        environ.update(env.as_environ())
        environ["PYTHONUNBUFFERED"] = "1"  # the log follows the trainer live
        if self.settings.trainer_device == "cpu":
            environ["CUDA_VISIBLE_DEVICES"] = ""
        # Concurrent trainers share this machine's cores. torch's default, a thread per core in
        # every process, oversubscribes them, and OpenMP's spinning threads then slow every run
        # down many times over (two digits runs side by side on 2 cores: 64 s each with a thread
        # each, 448 s each with the default). An OMP_NUM_THREADS of the operator's wins.
        environ.setdefault("OMP_NUM_THREADS", str(threads_per_trainer(self.settings)))
        return environ

    def _spawn(
        self,
        paths: dict[str, Path],
        command: list[str],
        environ: dict[str, str],
        run_dir: Path,
        log_file: BinaryIO,
    ) -> subprocess.Popen[bytes]:
        """Start the supervisor, which starts the trainer and records its pid and exit status."""
        try:
            return subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    SUPERVISOR,
                    str(paths["exit"]),
                    str(paths["pid"]),
                    *command,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=environ,
                cwd=run_dir,
                start_new_session=True,
            )
        except OSError as exc:
            raise DispatchError("permanent", f"cannot start the trainer: {exc}") from exc

    def status(self, execution_name: str) -> ExecutionStatus:
        try:
            run_id, segment, supervisor = self.parse_name(execution_name)
        except ValueError as exc:
            return ExecutionStatus("unknown", str(exc))
        paths = self._paths(run_id, segment)
        proc = self._procs.get(execution_name)
        code = self._exit_code(paths["exit"])
        if code is None:
            if self._alive(supervisor, paths["exit"], proc):
                return ExecutionStatus("running")
            # The supervisor died without writing (killed, or the machine restarted). The
            # exit file may have appeared in between: look once more.
            code = self._exit_code(paths["exit"])
            if code is None:
                return ExecutionStatus(
                    "failed",
                    self._with_tail(
                        "the trainer's supervisor ended without recording an exit code "
                        "(killed, or the machine restarted)",
                        paths["log"],
                    ),
                )
        if paths["cancel"].exists():
            return ExecutionStatus("cancelled", describe_exit(code))
        if code == 0:
            return ExecutionStatus("succeeded")
        return ExecutionStatus("failed", self._with_tail(describe_exit(code), paths["log"]))

    def cancel(self, execution_name: str) -> None:
        run_id, segment, supervisor = self.parse_name(execution_name)
        paths = self._paths(run_id, segment)
        # Recorded on disk, so that an api restarted mid-cancel still reports it as cancelled.
        paths["cancel"].touch()
        if self._exit_code(paths["exit"]) is not None:
            return
        with self._lock:
            if execution_name in self._kill_timers:
                return  # SIGTERM sent already; the SIGKILL is scheduled
            trainer = self._trainer_pid(paths["pid"])
            target = trainer if trainer is not None else supervisor  # it forwards SIGTERM
            _signal(target, signal.SIGTERM)
            timer = threading.Timer(self.grace_seconds, self._kill, (execution_name,))
            timer.daemon = True
            self._kill_timers[execution_name] = timer
            timer.start()

    def interrupt(self, execution_name: str) -> None:
        """SIGTERM to the trainer, nothing else: it saves a checkpoint and reports its segment
        done, and its run is queued for the next one (the service is stopping)."""
        run_id, segment, supervisor = self.parse_name(execution_name)
        paths = self._paths(run_id, segment)
        if self._exit_code(paths["exit"]) is None:
            trainer = self._trainer_pid(paths["pid"])
            _signal(trainer if trainer is not None else supervisor, signal.SIGTERM)

    def close(self) -> None:
        """Stop the pending SIGKILL timers. Trainers keep running: an api restart must not end
        them (the next api's worker finds them by their names)."""
        with self._lock:
            for timer in self._kill_timers.values():
                timer.cancel()
            self._kill_timers.clear()

    # -- extras the worker and the tests use ---------------------------------------------------

    def trainer_pid(self, execution_name: str) -> int | None:
        run_id, segment, _ = self.parse_name(execution_name)
        return self._trainer_pid(self._paths(run_id, segment)["pid"])

    def leftover_events(self, execution_name: str) -> list[str]:
        """Events the trainer of a finished execution could not deliver (its reporter's spool):
        the api reads them from the shared disk, so an api outage near a trainer's end loses
        nothing. Call only once the execution has ended."""
        run_id, _, _ = self.parse_name(execution_name)
        path = spool_file(self.spool_dir(), run_id)
        try:
            return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    def clear_leftover_events(self, execution_name: str) -> None:
        run_id, _, _ = self.parse_name(execution_name)
        spool_file(self.spool_dir(), run_id).unlink(missing_ok=True)

    # -- helpers -------------------------------------------------------------------------------

    def _kill(self, execution_name: str) -> None:
        run_id, segment, _ = self.parse_name(execution_name)
        paths = self._paths(run_id, segment)
        if self._exit_code(paths["exit"]) is None:
            trainer = self._trainer_pid(paths["pid"])
            if trainer is not None:
                log.warning(
                    "%s did not stop %ss after SIGTERM; sending SIGKILL",
                    execution_name,
                    self.grace_seconds,
                )
                # Its process group: the trainer and anything it started (data loaders).
                try:
                    os.killpg(trainer, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    _signal(trainer, signal.SIGKILL)
        with self._lock:
            self._kill_timers.pop(execution_name, None)

    @staticmethod
    def _exit_code(path: Path) -> int | None:
        try:
            return int(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    @staticmethod
    def _trainer_pid(path: Path) -> int | None:
        try:
            return int(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    @staticmethod
    def _alive(pid: int, exit_path: Path, proc: subprocess.Popen[bytes] | None) -> bool:
        if proc is not None:
            return proc.poll() is None
        # Started by an earlier api process: check that the pid is still our supervisor (the
        # kernel reuses pids) and not a zombie.
        proc_dir = Path(f"/proc/{pid}")
        if proc_dir.exists():
            try:
                cmdline = (proc_dir / "cmdline").read_bytes()
                state = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return False
            return str(exit_path).encode() in cmdline and state != "Z"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return sys.platform != "linux"  # no /proc entry on Linux means it is gone

    @staticmethod
    def _with_tail(message: str, log_path: Path) -> str:
        tail = log_tail(log_path)
        if not tail:
            return f"{message}; its log ({log_path}) is empty"
        return f"{message}; last lines of its log ({log_path}):\n{tail}"


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
