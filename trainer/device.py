"""A batch on the model's device, and the autocast the trainer computes under there."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch


def to_device(batch: Any, device: torch.device, float_dtype: torch.dtype) -> dict[str, Any]:
    """Move a processor batch to `device`; floating tensors (pixels) take the model's dtype."""
    out = {}
    for key, value in dict(batch).items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if value.is_floating_point():
                value = value.to(float_dtype)
        out[key] = value
    return out


def autocast(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
