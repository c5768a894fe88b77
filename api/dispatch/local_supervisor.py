"""The process side of the LocalDispatcher (api/dispatch/local.py): the supervisor that runs each
trainer and records how it ended, the words for an exit code, a log's tail, and the id of a
data directory that names which dispatcher owns an execution."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

LOG_TAIL_LINES = 25
LOG_TAIL_CHARS = 2500

# Runs the trainer in a process group of its own (so SIGKILL to that group spares the
# supervisor), forwards SIGTERM/SIGINT to it, and records how it ended. Written to be run by
# any Python 3, without the api installed.
SUPERVISOR = r"""
import os, signal, subprocess, sys
exit_path, pid_path = sys.argv[1], sys.argv[2]
cmd = sys.argv[3:]
pending = []
child = None
def forward(signum, frame):
    if child is None:
        pending.append(signum)
    else:
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
def write(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
try:
    child = subprocess.Popen(cmd, process_group=0)
except OSError as exc:
    print("tuneplane: cannot start the trainer: %s" % exc, flush=True)
    write(exit_path, "127")
    sys.exit(127)
write(pid_path, str(child.pid))
for signum in pending:
    os.kill(child.pid, signum)
code = child.wait()
write(exit_path, str(code))
sys.exit(code if code >= 0 else 128 - code)
"""


def log_tail(path: Path, lines: int = LOG_TAIL_LINES, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    tail = "\n".join(text.splitlines()[-lines:])
    return tail[-chars:]


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the trainer was killed by {name} (exit code {code})"
    if code == 127:
        return "the trainer could not be started (exit code 127)"
    return f"the trainer exited with code {code}"


def owner_id(data_dir: Path) -> str:
    """The data directory's id, made at its first use; `O_EXCL`, so that two processes starting
    on one directory at once agree on it."""
    path = data_dir / "dispatcher.id"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(uuid.uuid4().hex[:12])
    for _ in range(100):  # the other process may be between its open and its write
        if owner := path.read_text().strip():
            return owner
        time.sleep(0.01)
    raise RuntimeError(f"{path} is empty; remove it and start again")
