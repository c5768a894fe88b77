"""The callback events: the other half of the api <-> trainer contract (docs/architecture.md).

The trainer posts these to `POST /api/v1/runs/{id}/events`; the api validates them with the same
models. Every event has a unique `id` (a retried post is stored once) and a per-run `seq` (so the
api can order them even when they arrive out of order); one (segment, attempt, seq) holds one
event, so a second id for a taken seq is refused (409). Sizes are bounded so one bad payload
cannot fill the database, and no number may be NaN or infinite (JSON's `NaN`, `Infinity`, and
`1e999`, which parses to infinity, are refused naming the field): a diverged loss is sent as
null. Imports nothing heavier than pydantic.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

# A request body larger than this is refused with 413 before it is parsed (a batch too).
MAX_EVENT_BYTES = 8 * 1024 * 1024
# The most events one `POST /runs/{id}/events:batch` may carry (more is a 422).
MAX_BATCH_EVENTS = 1_000
MAX_CLASSES = 2_000
# Every evaluated sample travels in one event (and bounds the spec's eval_size): 20,000
# predictions with Oxford-IIIT Pet's long breed names are about 4 MB, half the body limit.
MAX_PREDICTIONS = 20_000
MAX_TEXT = 2_000
# The api keeps these numbers in INTEGER columns (api/models), 32-bit on PostgreSQL: bounding
# them here makes both databases refuse the same values, with a 422 that names the field.
MAX_INT = 2**31 - 1
# trainer/report.py numbers segment s's events from s * 1,000,000, so `seq` stays within MAX_INT
# up to this segment (2,000 segments of a 55-minute budget are 76 days of training).
MAX_SEGMENT = 2_000

Phase = Literal["loading", "baseline_eval", "training", "final_eval", "uploading"]
Stage = Literal["baseline", "final"]
Text = Annotated[str, Field(max_length=MAX_TEXT)]
Count = Annotated[int, Field(ge=0, le=MAX_INT)]


class _Strict(BaseModel):
    # NaN and infinity have no JSON form to store or answer with; refusing them here names the
    # field in the 422 (the api used to store a NaN loss as null and call it applied).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ClassMetrics(_Strict):
    label: Text
    precision: float
    recall: float
    f1: float
    support: Count


class Prediction(_Strict):
    """One evaluation sample: the paired quality gate compares runs sample by sample."""

    sample_id: Text
    true_label: Text
    predicted_label: Text | None  # None: no label found in the answer
    raw_answer: Annotated[str, Field(max_length=500)]
    correct: bool


class Metrics(_Strict):
    """What one evaluation pass measured."""

    accuracy: float = Field(ge=0, le=1)
    macro_f1: float = Field(ge=0, le=1)
    unknown_rate: float = Field(ge=0, le=1)
    num_samples: Count
    labels: Annotated[list[Text], Field(max_length=MAX_CLASSES)]
    per_class: Annotated[list[ClassMetrics], Field(max_length=MAX_CLASSES)]
    # confusion_matrix[i][j]: samples of labels[i] predicted as labels[j]; an extra last column
    # counts answers with no label in them (they are wrong, but not a class of their own).
    confusion_matrix: Annotated[list[list[int]], Field(max_length=MAX_CLASSES)]
    predictions: Annotated[list[Prediction], Field(max_length=MAX_PREDICTIONS)]
    samples_per_second: float | None = None
    seconds: float | None = None


# ---- payloads, one per event type -----------------------------------------------------------


class Started(_Strict):
    segment: Annotated[int, Field(ge=0, le=MAX_SEGMENT)] = 0
    attempt: Count = 0
    resumed_from_step: Count | None = None
    device: Text = ""
    host: Text = ""


class PhaseChange(_Strict):
    phase: Phase
    # What the phase runs with, in words (training: the step plan); shown on the run page.
    detail: Text = ""


class Progress(_Strict):
    step: Count
    total_steps: Count
    epoch: float = Field(ge=0)
    loss: float | None = None
    learning_rate: float | None = None
    samples_per_second: float | None = None
    gpu_memory_gb: float | None = None


class Evaluation(Metrics):
    stage: Stage


class Checkpoint(_Strict):
    step: Count
    uri: Text


class Artifact(_Strict):
    kind: Literal["adapter", "processor", "results", "merged", "output_dir", "log"]
    uri: Text


class SegmentDone(_Strict):
    step: Count
    checkpoint_uri: Text


class Completed(_Strict):
    step: Count = 0
    results_uri: Text | None = None


class Failed(_Strict):
    error: Text
    traceback_tail: Annotated[str, Field(max_length=20_000)] = ""


# ---- the envelope ---------------------------------------------------------------------------


class _Envelope(_Strict):
    id: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        default_factory=lambda: uuid.uuid4().hex
    )
    run_id: Annotated[str, Field(min_length=1, max_length=64)]
    seq: int = Field(
        ge=0, le=MAX_INT, description="per-run order; segment s counts up from s * 1,000,000"
    )
    segment: int = Field(
        0, ge=0, le=MAX_SEGMENT, description="which execution of a segmented run sent it"
    )
    # A platform retry of a task (Cloud Run's CLOUD_RUN_TASK_ATTEMPT) numbers its events from
    # the segment's start again: the attempt keeps its seqs apart from the failed attempt's.
    attempt: int = Field(0, ge=0, le=MAX_INT, description="the platform's retry of the segment")
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @field_validator("time")
    @classmethod
    def _in_utc(cls, value: datetime) -> datetime:
        # Stored in UTC: a time without an offset is ambiguous, and one near datetime's limits
        # (9999-12-31T23:59-23:59) has no UTC value at all.
        if value.tzinfo is None:
            raise ValueError("needs a UTC offset, e.g. 2025-01-01T12:00:00Z")
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise ValueError("is out of range once converted to UTC") from None


class StartedEvent(_Envelope):
    type: Literal["started"] = "started"
    data: Started = Field(default_factory=Started)


class PhaseEvent(_Envelope):
    type: Literal["phase"] = "phase"
    data: PhaseChange


class ProgressEvent(_Envelope):
    type: Literal["progress"] = "progress"
    data: Progress


class EvaluationEvent(_Envelope):
    type: Literal["evaluation"] = "evaluation"
    data: Evaluation


class CheckpointEvent(_Envelope):
    type: Literal["checkpoint"] = "checkpoint"
    data: Checkpoint


class ArtifactEvent(_Envelope):
    type: Literal["artifact"] = "artifact"
    data: Artifact


class SegmentDoneEvent(_Envelope):
    type: Literal["segment_done"] = "segment_done"
    data: SegmentDone


class CompletedEvent(_Envelope):
    type: Literal["completed"] = "completed"
    data: Completed = Field(default_factory=Completed)


class FailedEvent(_Envelope):
    type: Literal["failed"] = "failed"
    data: Failed


Event = Annotated[
    StartedEvent
    | PhaseEvent
    | ProgressEvent
    | EvaluationEvent
    | CheckpointEvent
    | ArtifactEvent
    | SegmentDoneEvent
    | CompletedEvent
    | FailedEvent,
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
EventType = Literal[
    "started",
    "phase",
    "progress",
    "evaluation",
    "checkpoint",
    "artifact",
    "segment_done",
    "completed",
    "failed",
]
FINAL_TYPES = frozenset({"completed", "failed", "segment_done"})


class EventBatch(_Strict):
    """The body of `POST /runs/{id}/events:batch`: events in the order they happened."""

    events: Annotated[list[Event], Field(max_length=MAX_BATCH_EVENTS)]


def parse_event(raw: bytes | str) -> Event:
    return EVENT_ADAPTER.validate_json(raw)


def batch_url(events_url: str) -> str:
    """Where a backlog of events goes in one request: the callback URL plus `:batch`."""
    return events_url + ":batch"
