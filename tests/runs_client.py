"""Submitting a run over REST and following it, for the tests that drive a whole api (in-process
in tests/test_loop.py, a `tuneplane serve` process in tests/faults/)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

HANG_GUARD_S = 240.0  # the tiny model on a loaded 2-core machine; only ends a hang
TERMINAL = ("succeeded", "failed", "cancelled")


def wait_until(done: Callable[[], Any], what: str, timeout: float = HANG_GUARD_S) -> Any:
    """Poll `done` until it returns something true; a hang guard, never a measurement."""
    deadline = time.monotonic() + timeout
    while not (result := done()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return result


class RunsClient:
    """`submit` a spec (the class's `spec`, changed by keyword) and `wait` for its run."""

    def __init__(self, url: str, spec: dict[str, Any], name: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=30)
        self.spec, self.name = spec, name

    def submit(self, model: Path, **changes: Any) -> str:
        spec = {"model_id": str(model), **self.spec, **changes}
        r = self.client.post("/api/v1/runs", json={"spec": spec, "name": self.name})
        assert r.status_code == 201, r.text
        run_id: str = r.json()["id"]
        return run_id

    def run(self, run_id: str) -> dict[str, Any]:
        r = self.client.get(f"/api/v1/runs/{run_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def wait(
        self, run_id: str, until: Callable[[dict[str, Any]], bool], what: str = "the run ended"
    ) -> Any:
        """The run once `until` holds for it, or once it has ended (the caller's asserts say
        which)."""

        def check() -> dict[str, Any] | None:
            run = self.run(run_id)
            return run if until(run) or run["status"] in TERMINAL else None

        return wait_until(check, f"timed out waiting until {what}")
