"""The run spec: command-line round trip (property-based) and messages that name the range."""

from __future__ import annotations

import typing
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, ValidationError

from trainer.contract.spec import DATASET_KINDS, RunSpec, describe_errors, field_bounds

NUMERIC = [n for n, f in RunSpec.model_fields.items() if f.annotation in (int, float)]


def _valid(values: dict[str, Any]) -> bool:
    try:
        RunSpec.model_validate(values)
    except ValidationError:
        return False
    return True


PATH_TEXT = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=40)
MODEL_IDS = st.one_of(
    st.sampled_from(["google/gemma-3-4b-it", "google/gemma-3-27b-it", "./tiny", "/m/x"]),
    st.from_regex(r"\A[A-Za-z0-9][\w.\-]{0,20}/[\w.\-]{1,20}\Z"),
    st.from_regex(r"\A[\w.\-]{1,30}\Z"),
    st.from_regex(r"\A-[\w.\-]{0,10}\Z"),  # a local name argparse could take for a flag
    st.builds(lambda head, tail: head + tail, st.sampled_from("./~"), PATH_TEXT),
).filter(lambda m: _valid({"model_id": m, "dataset": "digits"}))
DATASETS = st.one_of(
    st.just("digits"),
    st.just("oxford-iiit-pet"),
    st.builds(lambda p: f"oxford-iiit-pet:{p}", PATH_TEXT),
    st.builds(lambda p: f"imagefolder:{p}", PATH_TEXT),
).filter(lambda d: _valid({"model_id": "m", "dataset": d}))
MODULES = st.lists(
    st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,15}\Z"), min_size=1, max_size=32, unique=True
)


def _field_strategy(name: str) -> st.SearchStrategy[Any]:
    annotation = RunSpec.model_fields[name].annotation
    if name == "model_id":
        return MODEL_IDS
    if name == "dataset":
        return DATASETS
    if name == "lora_target_modules":
        return MODULES
    if name == "micro_batch_size":  # "auto" or a number of samples
        return st.one_of(st.just("auto"), st.integers(1, 512))
    if annotation is bool:
        return st.booleans()
    if typing.get_origin(annotation) is typing.Literal:
        return st.sampled_from(typing.get_args(annotation))
    lo, hi = field_bounds(name)
    if annotation is int:
        return st.integers(int(lo or 0), int(hi or 2**31))
    assert annotation is float, f"no strategy for {name}: {annotation}"
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


@st.composite
def specs(draw: st.DrawFn) -> RunSpec:
    values = {"model_id": draw(MODEL_IDS), "dataset": draw(DATASETS)}
    for name in RunSpec.model_fields:
        # Leave some fields out: their defaults must survive the round trip too.
        if name not in values and draw(st.booleans()):
            values[name] = draw(_field_strategy(name))
    return RunSpec.model_validate(values)


def test_every_field_has_a_strategy() -> None:
    for name in RunSpec.model_fields:
        _field_strategy(name)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_flags_round_trip(spec: RunSpec) -> None:
    flags = spec.to_flags()
    assert RunSpec.from_flags(flags) == spec
    # Every field is on the command line, so the trainer's defaults cannot change its meaning.
    named = {f[2:].split("=")[0].removeprefix("no-") for f in flags if f.startswith("--")}
    assert named == {n.replace("_", "-") for n in RunSpec.model_fields}


def test_flags_of_the_original_script_are_accepted() -> None:
    spec = RunSpec.from_flags(
        [
            "--model-id", "google/gemma-3-27b-it", "--dataset", "oxford-iiit-pet",
            "--train-size", "1000", "--eval-size", "500", "--num-epochs", "1",
            "--learning-rate", "2e-4", "--batch-size", "4", "--gradient-accumulation-steps", "4",
            "--lora-r", "16", "--lora-alpha", "32", "--lora-dropout", "0.05",
        ]
    )  # fmt: skip
    assert (spec.train_size, spec.batch_size, spec.learning_rate) == (1000, 4, 2e-4)
    assert spec.effective_batch_size == 16


def test_unknown_flags_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown flags: --epochs 3"):
        RunSpec.from_flags(["--model-id", "m", "--dataset", "digits", "--epochs", "3"])


@pytest.mark.parametrize("name", NUMERIC)
@pytest.mark.parametrize("side", ["below", "above"])
def test_out_of_range_names_the_field_and_the_whole_range(name: str, side: str) -> None:
    lo, hi = field_bounds(name)
    assert lo is not None and hi is not None, f"{name} must have both bounds"
    value = lo - 1 if side == "below" else hi + 1
    if RunSpec.model_fields[name].annotation is float:
        value = lo / 2 - 1 if side == "below" else hi * 2 + 1
    with pytest.raises(ValidationError) as caught:
        RunSpec(model_id="m", dataset="digits", **{name: value})
    [error] = describe_errors(caught.value)
    assert error["field"] == name
    assert error["message"].startswith(f"must be between {_num(lo)} and {_num(hi)} (got ")


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_the_same_message_from_the_command_line() -> None:
    with pytest.raises(ValidationError) as caught:
        RunSpec.from_flags(["--model-id", "m", "--dataset", "digits", "--lora-r", "0"])
    assert describe_errors(caught.value) == [
        {"field": "lora_r", "message": "must be between 1 and 1024 (got '0')"}
    ]


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        ({"dataset": "mnist"}, "dataset", "unknown data set 'mnist'"),
        ({"dataset": "imagefolder"}, "dataset", "'imagefolder' needs a directory"),
        ({"dataset": "digits:/x"}, "dataset", "'digits' takes no path"),
        ({"model_id": "a b"}, "model_id", "Hugging Face Hub id"),
        ({"lora_target_modules": ["q_proj", "q_proj"]}, "lora_target_modules", "twice"),
        ({"lora_target_modules": ["q-proj"]}, "lora_target_modules", "not a module name"),
        ({"colour": "red"}, "colour", "unknown field; the spec's fields are: model_id"),
    ],
)
def test_other_errors_say_what_to_do(values: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        RunSpec.model_validate({"model_id": "m", "dataset": "digits", **values})
    [error] = describe_errors(caught.value)
    assert error["field"] == field and message in error["message"]


def test_only_model_and_dataset_are_required() -> None:
    with pytest.raises(ValidationError) as caught:
        RunSpec.model_validate({})
    assert describe_errors(caught.value) == [
        {"field": "model_id", "message": "is required"},
        {"field": "dataset", "message": "is required"},
    ]
    assert RunSpec(model_id="m", dataset="digits").data.kind in DATASET_KINDS


def test_an_unknown_field_lists_the_fields_of_the_model_it_was_checked_against() -> None:
    # The gate form checks Gates: its unknown field must list Gates' fields, not the spec's.
    class Limits(BaseModel):
        model_config = ConfigDict(extra="forbid")
        min_accuracy: float | None = None
        significance: float = 0.05

    with pytest.raises(ValidationError) as caught:
        Limits.model_validate({"colour": 1})
    (err,) = describe_errors(caught.value, Limits)
    assert err == {
        "field": "colour",
        "message": "unknown field; the fields are: min_accuracy, significance",
    }
    with pytest.raises(ValidationError) as caught:
        RunSpec.model_validate({"colour": 1})
    unknown = [e for e in describe_errors(caught.value) if e["field"] == "colour"]
    assert unknown[0]["message"].startswith("unknown field; the spec's fields are: model_id")
