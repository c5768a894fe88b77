"""The demo's run (api/cli/demo.py): submitted over the REST API like any client's, followed in
the terminal until it ends, cancelled when the demo is stopped first."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, TextIO

import httpx
import uvicorn

from api.wording import secs

# The tiny model learns digits with these (shared/notes/tiny-gemma3.md: lr ~3e-3, batch 16,
# ~4 epochs over ~1,500 images reach 0.8-0.96 accuracy from a baseline near 0). One-token
# labels need few new tokens, which keeps the random model's baseline evaluation short.
# 1,400 because the digits' train split holds 1,438 images: a larger size would quietly
# train on fewer than it says (the trainer warns about it).
DEMO_SPEC: dict[str, Any] = {
    "dataset": "digits",
    "train_size": 1400,
    "eval_size": 250,
    "num_epochs": 4,
    "learning_rate": 3e-3,
    "batch_size": 16,
    "gradient_accumulation_steps": 1,
    "eval_batch_size": 64,
    "max_new_tokens": 4,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "gradient_checkpointing": False,
    "save_steps": 200,
    "seed": 42,
    "time_budget_minutes": 30,
}
POLL_SECONDS = 0.5
EVENTS_PAGE = 500


class Monitor:
    """Submits the demo's run over HTTP and follows it in the terminal."""

    def __init__(
        self,
        server: uvicorn.Server,
        url: str,
        model_dir: Path,
        *,
        exit_when_done: bool,
        out: TextIO,
    ) -> None:
        self.server, self.url, self.model_dir = server, url, model_dir
        self.exit_when_done = exit_when_done
        self.out = out
        self.tty = out.isatty()
        self.run_id: str | None = None
        self.status: str | None = None
        self.finished = False
        self.error: str | None = None
        self._last_line = ""
        self._decile = -1
        self._seq = -1  # the last event shown
        self._phases: list[str] = []

    def run(self) -> None:
        try:
            self._follow()
        except Exception as exc:  # the demo must say what broke, then stop
            self.error = f"{type(exc).__name__}: {exc}"
            self.server.should_exit = True

    def _follow(self) -> None:
        deadline = time.monotonic() + 60
        while not self.server.started:
            if self.server.should_exit or time.monotonic() > deadline:
                return
            time.sleep(0.05)
        with httpx.Client(base_url=self.url, timeout=30) as client:
            spec = {"model_id": str(self.model_dir), **DEMO_SPEC}
            r = client.post(
                "/api/v1/runs",
                json={"spec": spec, "name": "demo: tiny Gemma 3 on digits", "tags": ["demo"]},
            )
            if r.status_code != 201:
                raise RuntimeError(f"submitting the run failed ({r.status_code}): {r.text}")
            run = r.json()
            self.run_id = run["id"]
            self._say(
                f"run {self.run_id} submitted: the tiny Gemma 3 on scikit-learn's digits, "
                f"{spec['num_epochs']} epochs, batch {spec['batch_size']}, learning rate "
                f"{spec['learning_rate']:g}"
            )
            while True:
                if self.server.should_exit or getattr(self.server, "interrupted", False):
                    return  # Ctrl-C: cancel_run() says how the run ended
                run = client.get(f"/api/v1/runs/{self.run_id}").json()
                # After the run: its events all arrived before it ended (the trainer posts
                # them in order, `completed` last), so this last read misses none.
                self._show_new_events(client)
                if run["status"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(POLL_SECONDS)
            self.status = run["status"]
            self.finished = True
            self._end_line()
            metrics = client.get(f"/api/v1/runs/{self.run_id}/metrics").json()
            self._report(run, metrics)
        if self.exit_when_done:
            self.server.should_exit = True
        else:
            print("Serving until Ctrl-C.", file=self.out, flush=True)

    def cancel_run(self, timeout: float = 30) -> None:
        """Cancel the run if it is still going, and wait until it has stopped."""
        if self.run_id is None or self.finished:
            return
        self._say(f"tuneplane demo: cancelling {self.run_id} (Ctrl-C again to stop at once)…")
        with httpx.Client(base_url=self.url, timeout=10) as client:
            r = client.post(f"/api/v1/runs/{self.run_id}/cancel")
            if r.status_code not in (200, 409):  # 409: it finished meanwhile
                self._say(f"tuneplane demo: the cancel failed ({r.status_code}): {r.text}")
                return
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                run = client.get(f"/api/v1/runs/{self.run_id}").json()
                if run["status"] in ("succeeded", "failed", "cancelled"):
                    self.finished = True
                    self._say(f"run {self.run_id} {run['status']}: {run['status_reason']}")
                    return
                time.sleep(0.3)

    def _show_new_events(self, client: httpx.Client) -> None:
        """Every phase once, in order, and the training bar, from the trainer's events: read
        in order, not sampled, so a phase shorter than a poll is shown too and the bar's
        last line (the last step) comes before the next phase."""
        while True:
            page = client.get(
                f"/api/v1/runs/{self.run_id}/events",
                params={"after_seq": self._seq, "limit": EVENTS_PAGE},
            ).json()
            for event in page:
                self._seq = max(self._seq, event["seq"])
                if event["type"] == "phase" and event["data"]["phase"] not in self._phases:
                    self._phases.append(event["data"]["phase"])
                    self._say(f"phase: {event['data']['phase']}")
                elif event["type"] == "progress":
                    data = event["data"]
                    self._progress(data["step"], data["total_steps"], data.get("loss"))
            if len(page) < EVENTS_PAGE:
                return

    def _progress(self, step: int, total: int, loss: float | None) -> None:
        """The training bar (progress events come only while training)."""
        if not total:
            return
        width = 30
        filled = int(width * step / total)
        bar = "█" * filled + "░" * (width - filled)
        loss_text = f"  loss {loss:.3f}" if loss is not None else ""
        line = f"  training [{bar}] {step}/{total} steps{loss_text}"
        if self.tty:
            print("\r" + line.ljust(len(self._last_line)), end="", file=self.out, flush=True)
            self._last_line = line
        elif (decile := step * 10 // total) > self._decile:
            # Not a terminal (a CI log): one line per tenth of the steps.
            self._decile = decile
            print(line, file=self.out, flush=True)

    def _end_line(self) -> None:
        if self.tty and self._last_line:
            print(file=self.out)

    def _report(self, run: dict[str, Any], metrics: dict[str, Any]) -> None:
        status = run["status"]
        # The run's own duration, as its page shows it (api/runs/states.py duration_seconds).
        ran = run.get("duration_seconds")
        self._say(f"run {self.run_id} {status}" + (f": ran {secs(ran)}" if ran is not None else ""))
        if status != "succeeded":
            self._say(f"reason: {run.get('status_reason')}")
            if run.get("log_uri"):
                self._say(f"trainer log: {run['log_uri']}")
        rows = [("baseline", metrics.get("baseline")), ("final", metrics.get("final"))]
        if any(m for _, m in rows):
            print(f"  {'':<10}{'accuracy':>10}{'macro F1':>10}", file=self.out)
            for name, m in rows:
                if m:
                    print(
                        f"  {name:<10}{m['accuracy']:>10.3f}{m['macro_f1']:>10.3f}", file=self.out
                    )
        print(f"Dashboard: {self.url}/runs/{self.run_id}", file=self.out, flush=True)

    def _say(self, text: str) -> None:
        self._end_line()
        self._last_line = ""
        print(text, file=self.out, flush=True)
