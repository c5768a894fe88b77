"""Where a training step's time goes, and how much of the GPU it uses (bench/gpu_trainer.py).

One micro-batch at a time through the trainer's own pieces (trainer.model.load with a step
plan, TrainCollator, trainer.loss.training_loss, AdamW), timed with CUDA events: the vision
tower's forward (hooks on the tower and the projector), the rest of the forward (the language
model, its head and the loss), the backward, the optimizer. Data is the collator's wall time on
the CPU (the trainer prepares the next batch in a thread while the GPU works, so it only costs
where it is longer than the GPU's step).

FLOPs are counted, not measured: 2 x weights x tokens for every linear layer (the LM head only
at the positions the loss reads when the answer-only loss is on), plus 4 x tokens^2 x width for
attention; a frozen model's backward computes only input gradients (~ the forward's FLOPs), and
checkpointing's recomputation is not useful work. MFU = useful FLOP/s over the dense bf16
matrix rate (RATE_TFLOPS: ~790 TFLOP/s measured on this H200 in issue 16).
"""

from __future__ import annotations

import time
from typing import Any

import torch

RATE_TFLOPS = 790.0


def _linear_weights(module: torch.nn.Module) -> int:
    """Logical weights of the linear layers (bitsandbytes' Linear4bit is an nn.Linear whose
    packed weight has fewer elements, so count in x out). Only nn.Linear instances, no LoRA
    factors: peft's LoRA wrappers also have in/out_features, and counting them too doubled the
    language model's FLOPs in the first H200 run (bench/results/gpu_trainer_plan/README.md)."""
    return sum(
        m.in_features * m.out_features
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" not in name
    )


def flops_per_sample(model: Any, tokens: int, answer_tokens: int, answer_only: bool) -> dict:
    """(vision forward, language forward) FLOPs of one example."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    vision = base.model.vision_tower
    v = cfg.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    v_lin = _linear_weights(vision)
    vision_f = 2 * v_lin * patches + 4 * v.num_hidden_layers * patches**2 * v.hidden_size
    decoder = base.get_decoder()
    t = cfg.get_text_config()
    lm_lin = _linear_weights(decoder)
    head_positions = answer_tokens if answer_only else tokens
    lm_f = (
        2 * lm_lin * tokens
        + 4 * t.num_hidden_layers * tokens**2 * t.num_attention_heads * t.head_dim
        + 2 * t.hidden_size * t.vocab_size * head_positions
    )
    return {"vision_forward": float(vision_f), "language_forward": float(lm_f)}


class _Events:
    def __init__(self) -> None:
        self.marks: dict[str, list[torch.cuda.Event]] = {}

    def mark(self, name: str) -> None:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.marks.setdefault(name, []).append(e)

    def ms(self, start: str, end: str) -> float:
        return sum(
            a.elapsed_time(b) for a, b in zip(self.marks[start], self.marks[end], strict=True)
        )


def profile(loaded: Any, spec: Any, labels: list[str], samples: list[Any], steps: int) -> dict:
    """Mean seconds per sample of each phase over `steps` optimizer steps (after one warm-up
    step), peak memory, samples/s and MFU."""
    from trainer.collator import TrainCollator
    from trainer.device import to_device
    from trainer.loss import supports_answer_logits, training_loss

    model, plan = loaded.model, loaded.plan
    micro, accum = plan.micro_batch, plan.accumulation
    collate = TrainCollator(loaded.processor, labels, spec.max_length)
    answer_only = supports_answer_logits(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    base = model.get_base_model()
    ev = _Events()
    hooks = [
        base.model.vision_tower.register_forward_pre_hook(lambda *a: ev.mark("v0")),
        base.model.multi_modal_projector.register_forward_hook(lambda *a: ev.mark("v1")),
    ]
    model.train()
    data_s, n, tokens, answer = 0.0, 0, 0, 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    wall = 0.0
    try:
        for step in range(steps + 1):
            if step == 1:  # the first step warms kernels and the allocator up
                torch.cuda.synchronize()
                ev.marks.clear()
                data_s, n, wall = 0.0, 0, time.perf_counter()
            for k in range(accum):
                chunk = [samples[(step * accum + k) * micro + i] for i in range(micro)]
                t0 = time.perf_counter()
                batch = collate(chunk)
                data_s += time.perf_counter() - t0
                inputs = to_device(batch, torch.device("cuda"), torch.bfloat16)
                tokens = int(inputs["attention_mask"][0].sum())
                answer = int((inputs["labels"][0] != -100).sum())
                ev.mark("f0")
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = training_loss(model, inputs, answer_only)
                ev.mark("f1")
                (loss / accum).backward()
                ev.mark("b1")
                n += micro
            ev.mark("o0")
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ev.mark("o1")
        torch.cuda.synchronize()
        wall = time.perf_counter() - wall
    finally:
        for h in hooks:
            h.remove()
    vision_ms = ev.ms("v0", "v1")
    phases = {
        "data_cpu": data_s,
        "vision_forward": vision_ms / 1e3,
        "language_forward": (ev.ms("f0", "f1") - vision_ms) / 1e3,
        "backward": ev.ms("f1", "b1") / 1e3,
        "optimizer": ev.ms("o0", "o1") / 1e3,
    }
    f = flops_per_sample(model, tokens, answer, answer_only)
    useful = f["vision_forward"] + 2 * f["language_forward"]  # forward + input-grad backward
    sps = n / wall
    return {
        "plan": plan.as_dict(),
        "answer_only_logits": answer_only,
        "samples": n,
        "tokens_per_example": tokens,
        "samples_per_second": round(sps, 2),
        "tokens_per_second": round(sps * tokens, 1),
        "ms_per_sample": {k: round(v * 1e3 / n, 2) for k, v in phases.items()},
        "tflop_per_sample": {k: round(v / 1e12, 2) for k, v in f.items()},
        "mfu": round(useful * sps / (RATE_TFLOPS * 1e12), 3),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
