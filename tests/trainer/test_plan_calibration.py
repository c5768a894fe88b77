"""The step planner's memory estimate against every committed H200 measurement of a training
step (bench/results/*/profiles.json, written by bench/gpu_trainer.py): the estimate for the
profiled plan, model architecture and example length must be within 20% of the peak memory the
step allocated. A new bench run whose peaks move away from the model fails here until the
factors in trainer/plan.py are calibrated again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import architectures
from trainer.plan import GIB, model_memory, total_bytes

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
TOLERANCE = 0.20
LORA_R = 16  # the bench's spec: the RunSpec default


def _profiles() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(RESULTS.glob("*/profiles.json")):
        report = path.with_name("gpu_trainer.json")
        default = json.loads(report.read_text()).get("config", "4b") if report.exists() else "4b"
        for p in json.loads(path.read_text()):
            out.append((f"{path.parent.name}/{p['setting']}", {"config": default, **p}))
    return out


def test_there_are_measurements_to_check() -> None:
    assert len(_profiles()) >= 2


@pytest.mark.parametrize(("name", "profile"), _profiles(), ids=[n for n, _ in _profiles()])
def test_the_estimate_is_within_20_percent_of_the_measured_step(
    name: str, profile: dict[str, Any]
) -> None:
    plan = profile["plan"]
    config = architectures.config(profile["config"])
    mem = model_memory(config, LORA_R, profile["tokens_per_example"], None)
    estimate = (
        total_bytes(mem, plan["quantization"], plan["checkpointing"], plan["micro_batch"]) / GIB
    )
    measured = profile["peak_allocated_gib"]
    assert abs(estimate - measured) <= TOLERANCE * measured, (name, estimate, measured)
