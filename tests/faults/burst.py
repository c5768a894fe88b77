"""A burst of concurrent requests against a server, with the latency of each (for the README's
figures, never for an assert)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from tests.runs_client import HANG_GUARD_S


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
