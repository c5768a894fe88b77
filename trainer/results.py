"""results.json: everything a run measured, in one file next to the adapter.

The original script only logged its results (its `--results-file` was never written); CI gates
and the paired quality gate need them as data: the spec, where it ran, how long each phase took,
baseline and final metrics with every prediction, throughput and peak GPU memory.
"""

from __future__ import annotations

import json
import platform
import socket
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from trainer.contract.events import Metrics
from trainer.contract.spec import RunSpec

Outcome = Literal["completed", "segment_done", "failed"]
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "bitsandbytes",
    "datasets",
    "scikit-learn",
    "pillow",
    "tokenizers",
)


def environment(device: Any = None) -> dict[str, Any]:
    import torch

    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "packages": versions,
        "device": str(device) if device is not None else None,
        "cuda": torch.version.cuda,
        "gpu_name": None,
        "gpu_memory_gb": None,
        "cpu_count": _cpu_count(),
    }
    if device is not None and getattr(device, "type", None) == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_name"] = props.name
        env["gpu_memory_gb"] = round(props.total_memory / 1e9, 2)
    return env


def _cpu_count() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


@dataclass
class Results:
    spec: RunSpec
    run_id: str
    segment: int = 0
    outcome: Outcome | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    baseline: Metrics | None = None
    final: Metrics | None = None
    training: dict[str, Any] = field(default_factory=dict)
    peak_gpu_memory_gb: float | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    # The step plan that ran (trainer.plan.StepPlan.as_dict): micro-batch, accumulation,
    # checkpointing, quantization and the reason for each.
    step_plan: dict[str, Any] = field(default_factory=dict)

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = round(self.timings.get(phase, 0.0) + seconds, 3)

    def throughput(self) -> dict[str, float | None]:
        seconds = self.training.get("seconds") or 0.0
        samples = self.training.get("samples") or 0
        evals = [m for m in (self.baseline, self.final) if m and m.seconds]
        eval_samples = sum(m.num_samples for m in evals)
        eval_seconds = sum(m.seconds or 0.0 for m in evals)
        return {
            "train_samples_per_second": samples / seconds if seconds else None,
            "eval_samples_per_second": eval_samples / eval_seconds if eval_seconds else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "segment": self.segment,
            "outcome": self.outcome,
            "error": self.error,
            "spec": self.spec.model_dump(mode="json"),
            "environment": self.environment,
            "data": self.data,
            "model": self.model,
            "timings": self.timings,
            "baseline": self.baseline.model_dump(mode="json") if self.baseline else None,
            "final": self.final.model_dump(mode="json") if self.final else None,
            "training": self.training,
            # How accuracy was measured: "score" (the likeliest label) or "generate".
            "eval_mode": self.spec.eval_mode,
            "step_plan": self.step_plan,
            "throughput": self.throughput(),
            "peak_gpu_memory_gb": self.peak_gpu_memory_gb,
            "artifacts": self.artifacts,
        }

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
