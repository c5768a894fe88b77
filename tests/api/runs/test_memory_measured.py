"""The api's memory estimate against the peaks measured on the H200 (issue 13): within 15% at
each measured configuration, read from the committed bench results, so a change to the
estimator (or to what it is told about a family) that moves it away from what the trainer
really allocates fails here.

Each point is estimated for the configuration that ran: the trainer's own spec from its
results.json, with the step plan it chose (micro-batch, checkpointing, weights) made explicit,
and the sequence length the bench measured as max_length (the api otherwise guesses the prompt's
length from the data set). The models are the benches' random-weight builds of real
architectures: Gemma 3 4B is google/gemma-3-4b-it's (bench/gpu_trainer.py; estimated by that id,
as the bench does), Qwen2.5-VL-7B is estimated by its directory's name (a known family), and
Gemma 4 (31B widths, 6 of 60 layers) from the config.json that bench/gpu_families.py saves,
rebuilt here from the same config objects.

Not checked within 15%: the whole-run peaks of the Gemma 3 4B runs that scored labels in batches
of 32 (70.5 GiB NF4, 66.3 GiB bf16): label scoring sizes its continuation chunks to 40% of the
free memory, so on a 141 GB card their peak may be the card's, not the spec's (api/runs/memory.py).
For NF4 the step profile of the same plan gives the training peak, checked here; for bf16 there
is none, and the whole run's peak is only an upper bound of the training's, checked as one. Nor
the runs in bench/results/gpu_families/ itself: they measured the trainer before the vision
tower left 4-bit and the logits became answer-only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import Gemma4Config

from bench.gpu_families import gemma4_configs
from tests.api.runs.local_estimate import estimate
from trainer.contract.spec import RunSpec

RESULTS = Path(__file__).resolve().parents[3] / "bench" / "results"
FAMILIES = RESULTS / "gpu_families" / "after-plan"
TRAINER = RESULTS / "gpu_trainer_plan"
TOLERANCE = 0.15


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _spec(results: dict[str, Any], plan: dict[str, Any], tokens: int, **over: Any) -> RunSpec:
    """The trainer's spec as it ran: its plan's choices explicit, the measured length."""
    values = {
        **results["spec"],
        "micro_batch_size": plan["micro_batch"],
        "checkpointing": plan["checkpointing"],
        "quantization": plan["quantization"],
        "max_length": tokens,
        **over,
    }
    return RunSpec.model_validate(values)


def _gemma4_config(tmp: Path) -> dict[str, Any]:
    text, vision = gemma4_configs()
    Gemma4Config(text_config=text, vision_config=vision, audio_config=None).save_pretrained(tmp)
    return _read(tmp / "config.json")


def _family_points(tmp: Path) -> list[tuple[str, RunSpec, dict[str, Any] | None, float]]:
    points = []
    for arch in ("qwen2.5-vl-7b", "gemma4"):
        config = _gemma4_config(tmp) if arch == "gemma4" else None
        for run, report in (("explicit", f"explicit-{arch}"), ("defaults", f"gpu_families-{arch}")):
            measured = _read(FAMILIES / f"{report}.json")
            results = _read(
                FAMILIES / f"results-{'explicit-' if run == 'explicit' else ''}{arch}.json"
            )
            spec = _spec(results, results["step_plan"], measured["sequence_length"])
            points.append((f"{arch} {run}", spec, config, measured["peak_allocated_gib"]))
    return points


def _gemma3_points() -> list[tuple[str, RunSpec, dict[str, Any] | None, float]]:
    bench = _read(TRAINER / "gpu_trainer.json")
    rows = {r["setting"]: r for r in bench["rows"]}
    points = []
    for profile in bench["profiles"]:
        name = profile["setting"]
        results = _read(TRAINER / f"results-{name}.json")
        spec = _spec(
            results,
            profile["plan"],
            profile["tokens_per_example"],
            model_id="google/gemma-3-4b-it",
        )
        points.append(
            (f"gemma-3-4b {name} training step", spec, None, profile["peak_allocated_gib"])
        )
        if results["spec"]["eval_mode"] == "generate":  # see the module's docstring
            points.append(
                (f"gemma-3-4b {name} whole run", spec, None, rows[name]["peak_allocated_gib"])
            )
    return points


def measured_points(tmp: Path) -> list[tuple[str, RunSpec, dict[str, Any] | None, float]]:
    """(name, spec, config.json or None, measured peak allocated GiB) for every checked point."""
    return _gemma3_points() + _family_points(tmp)


def test_the_estimate_is_within_15_percent_of_every_measured_peak(tmp_path: Path) -> None:
    points = measured_points(tmp_path)
    # Every measured configuration is here: 3 Gemma 3 4B points, 2 of each other family.
    assert len(points) == 7
    errors = {}
    for name, spec, config, measured in points:
        est = estimate(spec, config)
        assert est.memory is not None, name
        errors[name] = round(est.memory.total_gib / measured - 1, 3)
    assert {n: e for n, e in errors.items() if abs(e) > TOLERANCE} == {}, errors


def test_the_points_are_the_configurations_that_ran(tmp_path: Path) -> None:
    by_name = {name: (spec, config) for name, spec, config, _ in measured_points(tmp_path)}
    spec, config = by_name["gemma4 explicit"]
    assert config is not None and config["text_config"]["num_hidden_layers"] == 6
    est = estimate(spec, config)
    # The bench's model: 4.91 B parameters (its gpu_families-gemma4.json), read from config.json.
    built = _read(FAMILIES / "explicit-gemma4.json")["model"]["parameters"]
    assert est.parameters == pytest.approx(built, rel=0.01)
    assert (spec.micro_batch_size, spec.checkpointing, spec.eval_mode) == (4, "full", "generate")
    qwen = estimate(by_name["qwen2.5-vl-7b explicit"][0])
    assert qwen.architecture == "qwen2.5-vl-7b"
    assert qwen.parameters == pytest.approx(
        _read(FAMILIES / "explicit-qwen2.5-vl-7b.json")["model"]["parameters"], rel=0.01
    )
    gemma3 = by_name["gemma-3-4b auto training step"][0]
    assert (gemma3.micro_batch_size, gemma3.checkpointing, gemma3.quantization) == (
        8,
        "none",
        "nf4",
    )


def test_the_bf16_estimate_stays_near_its_measured_bound() -> None:
    # Gemma 3 4B, bf16 weights, micro-batch 16, no checkpointing: the whole run's peak bounds
    # the training peak from above (see the module's docstring).
    bench = _read(TRAINER / "gpu_trainer.json")
    row = next(r for r in bench["rows"] if r["setting"] == "auto-bf16")
    results = _read(TRAINER / "results-auto-bf16.json")
    tokens = next(p for p in bench["profiles"] if p["setting"] == "auto")["tokens_per_example"]
    spec = _spec(results, results["step_plan"], tokens, model_id="google/gemma-3-4b-it")
    assert (spec.micro_batch_size, spec.quantization) == (16, "none")
    est = estimate(spec)
    assert est.memory is not None
    assert est.memory.total_gib <= (1 + TOLERANCE) * row["peak_allocated_gib"]
