"""`tuneplane demo`: the whole loop on this machine, in one command and a few minutes.

It serves the api and the dashboard on SQLite with the local dispatcher and the worker, builds
the tiny offline Gemma 3 into the data directory if it is not there, submits a digits run
through the REST API (over HTTP, as any client would), shows the run's progress, prints the
baseline and final accuracy and macro F1, and keeps serving until Ctrl-C (`--exit`: stop when
the run ends; the exit status says whether it succeeded).

What can go wrong before anything starts is checked first and said in one line: a data
directory that cannot be written, another demo using it (a lock file), a port in use.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TextIO

import uvicorn
from pydantic import ValidationError

from api.cli.demo_run import Monitor
from api.cli.ports import PortUnavailable, bind
from api.cli.settings import settings_errors
from api.config import Settings
from api.db import make_engine, migrate, session_scope

LOCK_NAME = "demo.lock"


class DemoError(Exception):
    """Something a person must fix before the demo can run; the message says what."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole loop locally: api + worker + a tiny model fine-tuned on digits",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".tuneplane"),
        help="where the database, model, logs and outputs go (default: .tuneplane)",
    )
    p.add_argument("--port", type=int, default=8000, help="port of the api and dashboard")
    p.add_argument(
        "--exit",
        action="store_true",
        help="stop when the run ends (exit status 0 only if it succeeded); for scripts",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # One sequence read top to bottom (checks, settings, model, server, cleanup, exit status);
    # its exits share the lock and the socket that the `with` holds, hence a little over ~60.
    out = sys.stdout
    started = time.monotonic()
    try:
        data_dir = args.data_dir.expanduser().resolve()
        lock = _lock_data_dir(data_dir)
        sock = bind("127.0.0.1", args.port)
    except (DemoError, PortUnavailable) as exc:
        print(f"tuneplane demo: {exc}", file=sys.stderr)
        return 2
    # The tiny model's tensors are too small for intra-op threads to pay, and on a busy machine
    # OpenMP's spinning threads slow training ten-fold: one thread per trainer (it inherits
    # this process's environment, as a container inherits its image's).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with lock, sock:
        url = f"http://127.0.0.1:{args.port}"
        try:  # the demo sets what it needs; the environment may still set the rest, badly
            settings = Settings(
                data_dir=data_dir,
                database_url=f"sqlite:///{data_dir / 'tuneplane.db'}",
                dispatcher="local",
                run_worker=True,
                public_url=url,
                max_concurrency=1,
                auth_enabled=False,
            )
        except ValidationError as exc:
            for line in settings_errors(exc):
                print(f"tuneplane demo: {line}", file=sys.stderr)
            return 2
        try:
            model_dir = _tiny_model(settings, out)
        except DemoError as exc:
            print(f"tuneplane demo: {exc}", file=sys.stderr)
            return 1
        engine = make_engine(settings.db_url)
        migrate(engine)
        engine.dispose()

        from api.main import create_app

        server = DemoServer(
            uvicorn.Config(create_app(settings), log_level="warning", lifespan="on")
        )
        monitor = Monitor(server, url, model_dir, exit_when_done=args.exit, out=out)
        server.monitor = monitor
        threading.Thread(target=monitor.run, name="tuneplane-demo", daemon=True).start()
        print(f"tuneplane demo: api and dashboard at {url} (data in {data_dir})", file=out)
        # After a second Ctrl-C uvicorn stops at once and raises the signal again; SIGTERM too
        # becomes KeyboardInterrupt then, so that the cleanup below runs.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            server.run(sockets=[sock])  # returns when the monitor says so, or on Ctrl-C
        except KeyboardInterrupt:
            server.interrupted = True
        interrupted = server.interrupted
        if monitor.run_id and not monitor.finished:
            # The api is gone (a second Ctrl-C, or the cancel did not finish): stop the
            # trainer from here.
            _cancel_unfinished(settings, monitor.run_id, out)
        print(f"tuneplane demo: stopped after {time.monotonic() - started:.0f} s", file=out)
        if monitor.error:
            print(f"tuneplane demo: {monitor.error}", file=sys.stderr)
            return 1
        if not args.exit:
            return 0  # Ctrl-C is how a serving demo ends
        if interrupted:
            return 130
        return 0 if monitor.status == "succeeded" else 1


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


class DemoServer(uvicorn.Server):
    """On the first Ctrl-C (or SIGTERM), cancel the demo's run while the api and its worker are
    still up, so that the trainer saves, reports and stops; then shut down. A second one stops
    at once."""

    monitor: Monitor | None = None
    interrupted = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.interrupted or self.monitor is None:
            super().handle_exit(sig, frame)
            return
        self.interrupted = True
        monitor = self.monitor

        def stop() -> None:
            try:
                monitor.cancel_run()
            finally:
                self.should_exit = True

        threading.Thread(target=stop, name="tuneplane-demo-stop", daemon=True).start()


# -- checks before anything starts ---------------------------------------------------------------


class _Lock:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> _Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing releases the lock; the file stays (harmless)


def _lock_data_dir(data_dir: Path) -> _Lock:
    """Create the data directory if needed and lock it for this demo, or say why not."""
    path = data_dir / LOCK_NAME
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise DemoError(
            f"cannot write to the data directory {data_dir} ({exc.strerror}); "
            "choose a writable one with --data-dir"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DemoError(
            f"another demo (pid {holder}) is using {data_dir}; stop it first, or give this one "
            "its own --data-dir"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        # A probe, because root ignores permission bits and only a real write tells.
        probe = data_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        os.close(fd)
        raise DemoError(
            f"cannot write to the data directory {data_dir} ({exc.strerror}); "
            "choose a writable one with --data-dir"
        ) from exc
    return _Lock(fd)


def _tiny_model(settings: Settings, out: TextIO) -> Path:
    """The tiny model's directory, built once by the trainer's own Python (the api never
    imports torch)."""
    path = settings.data_dir / "models" / "tiny-gemma3"
    if (path / "tiny-gemma3.json").is_file():
        return path
    print("tuneplane demo: building the tiny offline Gemma 3 (once)…", file=out, flush=True)
    python = settings.trainer_python or sys.executable
    result = subprocess.run(
        [python, "-m", "trainer.tiny", str(path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise DemoError(
            f"building the tiny model failed (is the trainer installed? pip install -e "
            f"'.[trainer]'):\n{tail}"
        )
    return path


def _cancel_unfinished(settings: Settings, run_id: str, out: TextIO) -> None:
    """Ctrl-C while the run is going: stop its trainer too, rather than leave it running."""
    from api.dispatch.worker import Worker
    from api.runs.service import cancel_run

    print(f"tuneplane demo: cancelling {run_id} (Ctrl-C again to leave it)…", file=out, flush=True)
    engine = make_engine(settings.db_url)
    try:
        with session_scope(engine) as session:
            cancel_run(session, settings, run_id, reason="the demo was stopped")
        worker = Worker(settings, engine, cancel_reask_seconds=5)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            worker.finish_cancels()
            with session_scope(engine) as session:
                from api.runs.models import Run

                run = session.get(Run, run_id)
                if run is None or run.status not in ("cancelling", "queued"):
                    break
            time.sleep(0.3)
        worker.dispatcher.close()
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # the run may have ended meanwhile (a 409): nothing to do
        print(f"tuneplane demo: {exc}", file=out)
    finally:
        engine.dispose()
