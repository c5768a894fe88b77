"""Answer-only logits give the plain path's loss and LoRA gradients (fp32 on the CPU: relative
1e-5 on the loss, 1e-4 on every gradient; only the summation order differs)."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer import data
from trainer import model as model_setup
from trainer.collator import TrainCollator
from trainer.contract.spec import RunSpec
from trainer.loss import answer_loss, supports_answer_logits


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_answer_only_logits_match_the_full_logits(tiny_model: Path) -> None:
    spec = RunSpec(model_id=str(tiny_model), dataset="digits", lora_dropout=0.0)
    torch.manual_seed(0)
    loaded = model_setup.load(spec, torch.device("cpu"))
    model = loaded.model.train()
    with torch.no_grad():  # LoRA B starts at zero: make the adapter's gradients non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    splits = data.load_splits("digits", 6, 1, seed=0)
    batch = TrainCollator(loaded.processor, splits.labels, 512)(splits.train)
    assert supports_answer_logits(model)

    plain = model(**batch).loss
    plain.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    loss = answer_loss(model, batch)
    loss.backward()
    got = _grads(model)

    assert torch.allclose(loss, plain, rtol=1e-5, atol=0)
    assert expected.keys() == got.keys() and any("lora_A" in n for n in got)
    for name, g in expected.items():
        scale = g.abs().max().clamp(min=1e-12)
        assert (got[name] - g).abs().max() / scale < 1e-4, name
