"""The original article's pet workload projected to other cards from this bench's H200 figures.

Workload: Gemma 3 27B, 3,600 training samples x 3 epochs, 3,669 evaluation samples (one pass;
tuneplane runs two, before and after training).

Method, written out so the figures can be redone by hand:
1. Work per sample is counted, not measured (bench/step_profile.flops_per_sample on the 27B
   architecture on the meta device, the bench's example length): training = vision forward +
   2 x language forward (forward, and the frozen model's input-gradient backward); evaluation =
   vision forward + language forward over the prompt (the label tree adds the same share of
   tokens to the 4B measurement and to the projection, so it cancels in the ratio).
2. The H200's achieved rate is measured: useful FLOP/s of this run's step profile (per weight
   format: NF4 from the "auto" profile, bf16 from "auto-bf16"; the largest architecture
   profiled) and of its final evaluation by scoring.
3. That rate is scaled by the cards' dense bf16 tensor throughput (spec sheets, below): the same
   kernels keep the same fraction of the peak. Where the card's plan checkpoints, the planner's
   own relative speed (trainer.plan.MODE_SPEED) applies.
4. Memory fit and the plan are the planner's (trainer.plan.choose with `quantization: auto` on
   the card's memory), the same estimate the trainer uses.
The cards' memory bandwidth is printed but not in the formula: at micro-batches of 8-16 the
step is compute-bound; on the L4 (300 GB/s) the projection is optimistic for small batches.

Dense bf16 tensor TFLOP/s (no sparsity) and memory bandwidth:
- H200 SXM: 989, 4.8 TB/s (NVIDIA H200 datasheet: 1,979 TFLOP/s with sparsity).
- RTX PRO 6000 Blackwell Server Edition: 503.8, 1,792 GB/s (hmc-tech.com spec table for the
  RTX PRO 6000 Blackwell, GB202 with 188 SMs at 2,617 MHz: "BF16 503.8 TFLOPS Tensor, 1.01
  PFLOPS Tensor Sparse"; gpu.name, from VideoCardz: "Memory Bandwidth: 1,792 GB/s"; the
  Server Edition has the same chip and memory). Its "4,000 AI TOPS" is FP4 with sparsity.
- L4: 121, 300 GB/s (NVIDIA L4 datasheet: 242 TFLOP/s FP16/BF16 with sparsity; hmc-tech.com
  lists 125.3 dense at the boost clock).
"""

from __future__ import annotations

from typing import Any

WORKLOAD = {"train_samples": 3600, "epochs": 3, "eval_samples": 3669, "effective_batch": 16}
H200_TFLOPS = 989.0
CARDS = {
    # name: (dense bf16 TFLOP/s, memory GB, bandwidth GB/s)
    "RTX PRO 6000 Blackwell Server Edition": (503.8, 96, 1792),
    "L4": (121.0, 24, 300),
}


def flops(name: str, tokens: int, answer: int = 6) -> dict[str, float]:
    """(vision forward, language forward) FLOPs of one example of architecture `name`."""
    import torch
    from transformers import AutoModelForImageTextToText

    from bench import architectures
    from bench.step_profile import flops_per_sample

    with torch.device("meta"):
        meta = AutoModelForImageTextToText.from_config(architectures.config(name))
    return flops_per_sample(meta, tokens, answer, True)


def _rates(profiles: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, float]:
    """Achieved useful FLOP/s on the H200: training per weight format, and evaluation."""
    rates: dict[str, float] = {}
    order = {"tiny": 0, "4b": 1, "12b": 2}
    for p in sorted(profiles, key=lambda p: order.get(p.get("config", "4b"), 0)):
        if p["setting"] in ("auto", "auto-bf16"):
            f = p["tflop_per_sample"]
            useful = (f["vision_forward"] + 2 * f["language_forward"]) * 1e12
            rates[p["plan"]["quantization"]] = useful * p["samples_per_second"]
    for r in sorted(rows, key=lambda r: order.get(r.get("config", "4b"), 0)):
        if r["setting"] == "auto" and r.get("eval_tflop_per_sample"):
            rates["eval"] = r["eval_tflop_per_sample"] * 1e12 * r["final_eval_samples_per_second"]
    return rates


def project(profiles: list[dict[str, Any]], rows: list[dict[str, Any]], tokens: int) -> str:
    """The projection as text (what bench/gpu_trainer.py prints last)."""
    from bench import architectures
    from trainer.plan import GIB, MODE_SPEED, choose, model_memory

    rates = _rates(profiles, rows)
    f = flops("27b", tokens)
    train_f = f["vision_forward"] + 2 * f["language_forward"]
    eval_f = f["vision_forward"] + f["language_forward"]
    w = WORKLOAD
    lines = [
        "Projection: Gemma 3 27B, 3,600 training samples x 3 epochs, 3,669 evaluations "
        "(method: bench/projection.py)",
        f"27B per sample: training {train_f / 1e12:.1f} TFLOP, evaluation "
        f"{eval_f / 1e12:.1f} TFLOP ({tokens} tokens); H200 achieved: "
        + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in sorted(rates.items())),
        "",
        "| card | dense bf16 TFLOP/s | memory | bandwidth GB/s | plan (planner) "
        "| training h | one evaluation min |",
        "|---|---|---|---|---|---|---|",
    ]
    for card, (tflops, gb, bw) in CARDS.items():
        mem = model_memory(architectures.config("27b"), 16, tokens, gb * 1e9 - 0.5 * GIB)
        plan = choose(w["effective_batch"], mem, quantization="auto")
        scale = tflops / H200_TFLOPS
        fits = not any("nothing fits" in r for r in plan.reasons)
        rate = rates.get(plan.quantization)
        if not fits:
            desc = f"does not fit: smallest plan est. {plan.estimated_gib} GiB"
            train_h = eval_min = "-"
        else:
            desc = (
                f"{plan.micro_batch} x {plan.accumulation}, {plan.checkpointing}, "
                f"{plan.quantization}, est. {plan.estimated_gib} GiB"
            )
            speed = MODE_SPEED[plan.checkpointing]
            train_h = "-"
            if rate:
                train_s = w["train_samples"] * w["epochs"] * train_f / (rate * scale * speed)
                train_h = f"{train_s / 3600:.1f}"
            e = rates.get("eval")
            eval_min = f"{w['eval_samples'] * eval_f / (e * scale) / 60:.1f}" if e else "-"
        lines.append(f"| {card} | {tflops} | {gb} GB | {bw} | {desc} | {train_h} | {eval_min} |")
    return "\n".join(lines)
