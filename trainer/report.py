"""How the trainer tells the world what it is doing: a small Protocol and a stdout reporter.

`main` builds events through `EventLog`, which numbers them, and hands each to a `Reporter`.
`emit` must never stall training (the HTTP reporter queues and posts from a thread); `close`
flushes what is pending and is called once, at exit.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol, TextIO

from trainer.contract import events as ev


class Reporter(Protocol):
    def emit(self, event: ev.Event) -> None: ...

    def close(self, timeout: float = 30.0) -> None: ...


class StdoutReporter:
    """One JSON line per event: for runs by hand, and readable in Cloud Logging."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def emit(self, event: ev.Event) -> None:
        print(event.model_dump_json(), file=self.stream, flush=True)

    def close(self, timeout: float = 30.0) -> None:
        self.stream.flush()


class EventLog:
    """Stamps events with the run id, segment and a per-execution sequence number.

    Segment s numbers its events from s * 1_000_000 so that `seq` orders a whole segmented run
    without the trainer having to know how many events earlier segments sent.
    """

    SEQ_PER_SEGMENT = 1_000_000

    def __init__(self, reporter: Reporter, run_id: str, segment: int = 0) -> None:
        self.reporter = reporter
        self.run_id = run_id
        self.segment = segment
        self._seq = segment * self.SEQ_PER_SEGMENT

    def emit(self, event_type: ev.EventType, data: Any = None) -> ev.Event:
        payload: dict[str, Any] = {
            "type": event_type,
            "run_id": self.run_id,
            "seq": self._seq,
            "segment": self.segment,
        }
        if data is not None:
            payload["data"] = data.model_dump() if hasattr(data, "model_dump") else data
        event = ev.EVENT_ADAPTER.validate_python(payload)
        self._seq += 1
        self.reporter.emit(event)
        return event
