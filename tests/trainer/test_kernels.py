"""When the trainer fuses kernels (trainer/kernels.py), and when it must not. That the fused
kernels compute the plain model's loss and gradients needs a GPU:
tests/trainer/test_gpu_kernels.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer import kernels
from trainer import model as model_setup
from trainer.contract.spec import RunSpec


def test_the_cpu_never_fuses(tiny_model: Path) -> None:
    base = model_setup.load_base(str(tiny_model), torch.device("cpu"))
    assert type(base).__name__ == "Gemma3ForConditionalGeneration"
    forwards = {n: type(m).forward for n, m in base.named_modules()}
    assert kernels.fuse(base, torch.device("cpu"), "auto") == kernels.PLAIN
    assert {n: type(m).forward for n, m in base.named_modules()} == forwards


@pytest.mark.parametrize("setting", ["plain", "auto"])
def test_plain_kernels_or_another_family_are_left_alone_on_cuda(setting: str) -> None:
    # Decided before anything touches CUDA, so this runs on a machine without one.
    other = torch.nn.Linear(2, 2)
    assert kernels.fuse(other, torch.device("cuda"), setting) == kernels.PLAIN


def test_the_spec_takes_kernels_and_refuses_an_unknown_value() -> None:
    assert RunSpec(model_id="m", dataset="digits").kernels == "auto"
    assert (
        RunSpec.from_flags(["--model-id", "m", "--dataset", "digits", "--kernels", "plain"]).kernels
        == "plain"
    )
    with pytest.raises(ValueError, match="kernels"):
        RunSpec(model_id="m", dataset="digits", kernels="triton")  # type: ignore[arg-type]


def test_a_loaded_model_says_which_kernels_run(tiny_model: Path) -> None:
    spec = RunSpec(model_id=str(tiny_model), dataset="digits")
    assert model_setup.load(spec, torch.device("cpu")).kernels == kernels.PLAIN
