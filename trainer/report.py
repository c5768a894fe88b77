"""How the trainer tells the world what it is doing: a small Protocol and the local reporters.

`main` builds events through `EventLog`, which numbers them, and hands each to a `Reporter`.
`emit` must never stall training (the HTTP reporter queues and posts from a thread); `close`
flushes what is pending and is called once, at exit.

Who gets what (`make_reporter`): a person reads stdout, so it always gets one readable line per
event (`ConsoleReporter`; an evaluation's confusion matrix and predictions stay out of it). The
whole JSON events go to the api's callback when the dispatcher set one, and to a JSON-lines file
when `--events-file` asks for it (runs by hand, scripts, tests).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import Any, Protocol, TextIO

from trainer.contract import events as ev
from trainer.contract.execution import ExecutionEnv


class Reporter(Protocol):
    def emit(self, event: ev.Event) -> None: ...

    def close(self, timeout: float = 30.0) -> None: ...


class JsonLinesReporter:
    """One JSON object a line, flushed after each, so a reader sees an event once it happened.
    A path is opened for appending: the segments of a run resumed by hand add to one story."""

    def __init__(self, target: TextIO | Path) -> None:
        if isinstance(target, Path):
            target.parent.mkdir(parents=True, exist_ok=True)
            self.stream: TextIO = target.open("a", encoding="utf-8")
            self._owned = True
        else:
            self.stream, self._owned = target, False

    def emit(self, event: ev.Event) -> None:
        print(event.model_dump_json(), file=self.stream, flush=True)

    def close(self, timeout: float = 30.0) -> None:
        self.stream.flush()
        if self._owned:
            self.stream.close()


def _started(d: ev.Started) -> str:
    where = f"started on {d.device or 'an unknown device'}" + (f" ({d.host})" if d.host else "")
    extra = f", segment {d.segment}" if d.segment else ""
    extra += f", attempt {d.attempt}" if d.attempt else ""
    resumed = f", resuming from step {d.resumed_from_step}" if d.resumed_from_step else ""
    return where + extra + resumed


def _progress(d: ev.Progress) -> str:
    parts = [f"step {d.step}/{d.total_steps}", f"epoch {d.epoch:.2f}"]
    if d.loss is not None:
        parts.append(f"loss {d.loss:.4f}")
    if d.learning_rate is not None:
        parts.append(f"learning rate {d.learning_rate:.2e}")
    if d.samples_per_second is not None:
        parts.append(f"{d.samples_per_second:.1f} samples/s")
    return ", ".join(parts)


def _evaluation(d: ev.Evaluation) -> str:
    return (
        f"{d.stage}: accuracy {d.accuracy:.3f}, macro F1 {d.macro_f1:.3f}, "
        f"no label {d.unknown_rate:.3f} over {d.num_samples} samples"
    )


_LINES: dict[str, Callable[[Any], str]] = {
    "started": _started,
    "phase": lambda d: f"phase: {d.phase}",
    "progress": _progress,
    "evaluation": _evaluation,
    "checkpoint": lambda d: f"checkpoint at step {d.step}: {d.uri}",
    "artifact": lambda d: f"{d.kind}: {d.uri}",
    "segment_done": lambda d: f"segment done at step {d.step}; checkpoint: {d.checkpoint_uri}",
    "completed": lambda d: f"completed at step {d.step}; results: {d.results_uri}",
    "failed": lambda d: f"failed: {d.error}",
}


def describe(event: ev.Event) -> str:
    """One line a person reads, for any event."""
    line = _LINES.get(event.type)
    return line(event.data) if line else event.type


class ConsoleReporter:
    """A readable line per event, stamped like the log (`HH:MM:SS message`)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def emit(self, event: ev.Event) -> None:
        print(
            f"{event.time.astimezone(UTC):%H:%M:%S} {describe(event)}", file=self.stream, flush=True
        )

    def close(self, timeout: float = 30.0) -> None:
        self.stream.flush()


class FanOut:
    """Every event to each reporter, in order; closing closes them all."""

    def __init__(self, reporters: list[Reporter]) -> None:
        self.reporters = reporters

    def emit(self, event: ev.Event) -> None:
        for reporter in self.reporters:
            reporter.emit(event)

    def close(self, timeout: float = 30.0) -> None:
        for reporter in self.reporters:
            reporter.close(timeout)


def make_reporter(env: ExecutionEnv, output_dir: Path, events_file: Path | None) -> Reporter:
    reporters: list[Reporter] = [ConsoleReporter()]
    if env.callback_url:
        # Imported here: a run by hand needs no HTTP client.
        from trainer.report_http import HttpReporter

        # One spool file per run (trainer.report_http.spool_file): the spool directory may be
        # shared by runs, and the local dispatcher reads a finished run's leftovers from it.
        reporters.append(HttpReporter.for_execution(env, output_dir))
    if events_file is not None:
        reporters.append(JsonLinesReporter(events_file))
    return FanOut(reporters)


class EventLog:
    """Stamps events with the run id, segment and a per-execution sequence number.

    Segment s numbers its events from s * 1_000_000 so that `seq` orders a whole segmented run
    without the trainer having to know how many events earlier segments sent.
    """

    SEQ_PER_SEGMENT = 1_000_000

    def __init__(self, reporter: Reporter, run_id: str, segment: int = 0, attempt: int = 0) -> None:
        self.reporter = reporter
        self.run_id = run_id
        self.segment = segment
        self.attempt = attempt  # a platform retry numbers again; the api keys on both
        self._seq = segment * self.SEQ_PER_SEGMENT

    def emit(self, event_type: ev.EventType, data: Any = None) -> ev.Event:
        payload: dict[str, Any] = {
            "type": event_type,
            "run_id": self.run_id,
            "seq": self._seq,
            "segment": self.segment,
            "attempt": self.attempt,
        }
        if data is not None:
            payload["data"] = data.model_dump() if hasattr(data, "model_dump") else data
        event = ev.EVENT_ADAPTER.validate_python(payload)
        self._seq += 1
        self.reporter.emit(event)
        return event
