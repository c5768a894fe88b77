"""The callback event contract: typed payloads, stable numbering, bounded sizes."""

import io
import json

import pytest
from pydantic import ValidationError

from trainer import events as ev
from trainer.report import EventLog, StdoutReporter


def test_event_log_numbers_events_per_segment_and_validates_payloads() -> None:
    out = io.StringIO()
    log = EventLog(StdoutReporter(out), run_id="run_1", segment=2)
    first = log.emit("started", ev.Started(segment=2))
    second = log.emit("progress", ev.Progress(step=5, total_steps=10, epoch=0.5, loss=1.25))
    assert (first.seq, second.seq) == (2_000_000, 2_000_001)
    assert first.id != second.id
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["type"] for line in lines] == ["started", "progress"]
    # What went out parses back into the same typed event on the api side.
    assert ev.parse_event(json.dumps(lines[1])) == second
    with pytest.raises(ValidationError):
        log.emit("phase", {"phase": "dreaming"})


def test_unknown_types_and_extra_fields_are_refused() -> None:
    base = {"run_id": "r", "seq": 0}
    with pytest.raises(ValidationError):
        ev.parse_event(json.dumps({**base, "type": "exploded"}))
    with pytest.raises(ValidationError):
        ev.parse_event(json.dumps({**base, "type": "started", "surprise": 1}))


def test_payload_sizes_are_bounded() -> None:
    too_long = "x" * (ev.MAX_TEXT + 1)
    with pytest.raises(ValidationError):
        ev.parse_event(
            json.dumps({"run_id": "r", "seq": 0, "type": "failed", "data": {"error": too_long}})
        )
