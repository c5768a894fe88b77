"""`tuneplane serve` in a subprocess with its log in a file, for the load and outage tests: a
real server whose answers and log lines a test can count, and a burst of concurrent requests
with the latency of each (for the README's figures, never for an assert)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx

from tests.conftest import free_port

HANG_GUARD_S = 240.0  # ends a hang on a loaded 2-core machine; never a measurement
# What must never be in the server's log: SQLite's lock error, the pool running dry, a 500.
LOG_FAULTS = re.compile(
    r'database is locked|QueuePool limit|TimeoutError|Traceback|HTTP/1\.1" 500 '
)


class Served:
    """One `tuneplane serve` on a free port, its own data directory and the given database;
    extra settings by name (`db_pool_size="2"` is TUNEPLANE_DB_POOL_SIZE)."""

    def __init__(self, tmp: Path, db_url: str, **settings: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"serve-{self.port}.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEPLANE_")}
        self.env.update(
            TUNEPLANE_DATA_DIR=str(tmp / "data"),
            TUNEPLANE_DATABASE_URL=db_url,
            TUNEPLANE_RUN_WORKER="false",  # no dispatch: what is measured is the api alone
            TUNEPLANE_HUB_URL="",
            OMP_NUM_THREADS="1",
        )
        self.env.update({f"TUNEPLANE_{k.upper()}": v for k, v in settings.items()})
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Served:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "api", "serve", "--port", str(self.port)],
                env=self.env,
                cwd=self.log_path.parent,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=10).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"serve never became ready:\n{self.log()}"
            time.sleep(0.1)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def faults_in_log(self) -> list[str]:
        return [line for line in self.log().splitlines() if LOG_FAULTS.search(line)]


@dataclass
class Answer:
    status: int
    headers: httpx.Headers
    body: object
    seconds: float


Send = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


async def _burst(url: str, n: int, send: Send) -> tuple[list[Answer], float]:
    # One connection per request, all opened at once: n requests really are in flight together.
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=HANG_GUARD_S, limits=limits) as client:
        start = asyncio.Event()

        async def one(i: int) -> Answer:
            await start.wait()
            t0 = time.perf_counter()
            r = await send(client, i)
            elapsed = time.perf_counter() - t0
            body = r.json() if r.content else None
            return Answer(r.status_code, r.headers, body, elapsed)

        tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
        await asyncio.sleep(0)  # every task is waiting on `start`
        t0 = time.perf_counter()
        start.set()
        answers = await asyncio.gather(*tasks)
        return answers, time.perf_counter() - t0


def burst(url: str, n: int, send: Send) -> tuple[list[Answer], float]:
    """`n` concurrent requests made by `send(client, i)`: their answers, and the wall time."""
    return asyncio.run(_burst(url, n, send))


def figure(name: str, answers: list[Answer], wall: float) -> str:
    """`name: N requests in W s, p50 X ms, p99 Y ms` (printed with -s, for the README)."""
    ms = sorted(a.seconds * 1000 for a in answers)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    line = (
        f"FIGURE {name}: {len(ms)} requests in {wall:.2f} s, "
        f"p50 {statistics.median(ms):.0f} ms, p99 {p99:.0f} ms"
    )
    print(line)
    return line
