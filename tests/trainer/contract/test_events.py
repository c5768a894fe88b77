"""The callback event contract: typed payloads, stable numbering, bounded sizes."""

import io
import json

import pytest
from pydantic import ValidationError

from trainer.contract import events as ev
from trainer.contract.spec import field_bounds
from trainer.report import EventLog, JsonLinesReporter


def test_event_log_numbers_events_per_segment_and_validates_payloads() -> None:
    out = io.StringIO()
    log = EventLog(JsonLinesReporter(out), run_id="run_1", segment=2)
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


def test_the_last_segment_numbers_its_events_within_the_seq_bound() -> None:
    # EventLog numbers segment s's events from s * SEQ_PER_SEGMENT; the envelope's bounds must
    # leave every event of the last segment it allows a valid seq.
    last = (ev.MAX_SEGMENT + 1) * EventLog.SEQ_PER_SEGMENT - 1
    assert last <= ev.MAX_INT
    log = EventLog(JsonLinesReporter(io.StringIO()), run_id="run_1", segment=ev.MAX_SEGMENT)
    assert log.emit("started", ev.Started(segment=ev.MAX_SEGMENT)).seq <= ev.MAX_INT
    with pytest.raises(ValidationError):
        EventLog(JsonLinesReporter(io.StringIO()), "run_1", ev.MAX_SEGMENT + 1).emit("started", {})


# Oxford-IIIT Pet's longest breed names, each answer wrong: a large prediction for that data set.
_PET_PREDICTION = ev.Prediction(
    sample_id="test/american_pit_bull_terrier_123.jpg",
    true_label="American Pit Bull Terrier",
    predicted_label="Staffordshire Bull Terrier",
    raw_answer="Staffordshire Bull Terrier",
    correct=False,
)


def test_the_largest_evaluation_a_spec_allows_fits_one_event() -> None:
    # The trainer reports every evaluated sample in one `evaluation` event: a spec's largest
    # eval_size must be accepted by the event's model and fit the api's body limit.
    _, most = field_bounds("eval_size")
    assert most is not None and most <= ev.MAX_PREDICTIONS
    n = int(most)
    labels = [f"breed {i}" for i in range(37)]
    event = ev.EvaluationEvent(
        run_id="run_1",
        seq=1,
        data=ev.Evaluation(
            stage="baseline",
            accuracy=0.0,
            macro_f1=0.0,
            unknown_rate=0.0,
            num_samples=n,
            labels=labels,
            per_class=[
                ev.ClassMetrics(label=label, precision=0, recall=0, f1=0, support=n // 37)
                for label in labels
            ],
            confusion_matrix=[[n] * 38 for _ in labels],
            predictions=[_PET_PREDICTION] * n,
        ),
    )
    body = event.model_dump_json().encode()
    assert len(body) <= ev.MAX_EVENT_BYTES, f"{len(body):,} bytes"
    assert ev.parse_event(body) == event
