"""The step plan: micro-batch, gradient checkpointing and accumulation, and the weights'
quantization, chosen from the model's estimated memory and the GPU's free memory.

The spec fixes what an optimizer step means: `batch_size x gradient_accumulation_steps` samples
(the effective batch). The plan only chooses how they are split: micro-batch `m` (a divisor of
the effective batch, so each step still sees the same samples in the same order) and
accumulation `effective / m`. Explicit spec values win (`micro_batch_size`, `checkpointing`,
`quantization`); `gradient_checkpointing: false` forbids checkpointing.

`choose` is a pure function of stated memory figures (tests/trainer/test_plan.py); `plan_run`
measures them: the model's parameter count from its config on the meta device, the tokens of a
real training example from the collator, and `torch.cuda.mem_get_info`.

Activation memory per sample is `layers x tokens x hidden x bytes-per-element factor`. The
factors are calibrated on H200 measurements of the training step alone (Gemma 3 4B, LoRA r16,
answer-only logits, no checkpointing): NF4 from bench/results/gpu_trainer_plan/profiles.json
(40.8 GiB at micro-batch 8, 466 tokens: ~113 bytes; the first factor, 230, predicted 76.6 GiB),
bf16 from issue 16's measurement (36 GB at micro-batch 8, 63 GB at 16: ~82 bytes).
tests/trainer/test_plan_calibration.py checks every committed bench profile against the
estimate (within 20%), and bench/gpu_trainer.py prints the estimate beside the measured peak.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

GIB = 2**30
# Bytes per (layer x token x hidden unit) kept for the backward pass, without checkpointing.
ACT_FACTOR = {"none": 82.0, "nf4": 113.0}
# With full checkpointing each layer keeps its bf16 input; one layer is recomputed at a time.
CHECKPOINTED_FACTOR = 2.0
# What the plan leaves free: a fraction of the free memory plus a fixed reserve (allocator
# fragmentation, CUDA workspaces, the evaluation's cache).
MARGIN_FRACTION = 0.15
MARGIN_BYTES = 3 * GIB
MAX_MICRO = 16
# Relative step speeds, measured on the H200 (issue 16): checkpointing recomputes the forward
# (full: ~1/3 slower), bf16 weights skip the 4-bit dequantization (~1.6x).
MODE_SPEED = {"none": 1.0, "selective": 0.85, "full": 0.72}
QUANT_SPEED = {"none": 1.6, "nf4": 1.0}


@dataclass(frozen=True)
class MemoryInputs:
    """What the plan is chosen from, in bytes (free None: no GPU, nothing to plan against)."""

    free: float | None
    weights: dict[str, float]  # by quantization: "nf4", "none"
    layers: int
    hidden: int
    tokens: int  # of one training example
    fixed: float = 0.0  # adapters, optimizer state, the projector


@dataclass(frozen=True)
class StepPlan:
    micro_batch: int
    accumulation: int
    checkpointing: str  # none | selective | full
    quantization: str  # nf4 | none
    estimated_gib: float | None
    free_gib: float | None
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"micro-batch {self.micro_batch} x accumulation {self.accumulation}, "
            f"checkpointing {self.checkpointing}, weights {self.quantization}: "
            + "; ".join(self.reasons)
        )


def activation_bytes(mem: MemoryInputs, quant: str, mode: str) -> float:
    """Per sample."""
    full = mem.layers * mem.tokens * mem.hidden * ACT_FACTOR[quant]
    kept = mem.layers * mem.tokens * mem.hidden * CHECKPOINTED_FACTOR
    one_layer = full / max(mem.layers, 1)
    if mode == "none":
        return full
    if mode == "full":
        return kept + one_layer
    return (full + kept) / 2 + one_layer  # selective: every other layer checkpointed


def total_bytes(mem: MemoryInputs, quant: str, mode: str, micro: int) -> float:
    return mem.weights[quant] + mem.fixed + micro * activation_bytes(mem, quant, mode)


def choose(
    effective: int,
    mem: MemoryInputs,
    *,
    micro: int | None = None,
    checkpointing: str | None = None,
    allow_checkpointing: bool = True,
    quantization: str = "nf4",
    default_micro: int | None = None,
) -> StepPlan:
    """The fastest plan that fits (by MODE_SPEED x QUANT_SPEED x m / (m + 1): larger
    micro-batches keep the GPU busier, with diminishing returns)."""
    if micro is not None and effective % micro:
        raise ValueError(
            f"micro_batch_size {micro} does not divide the effective batch {effective} "
            "(batch_size x gradient_accumulation_steps)"
        )
    quants = ["none", "nf4"] if quantization == "auto" else [quantization]
    modes = (
        [checkpointing]
        if checkpointing
        else (["none", "selective", "full"] if allow_checkpointing else ["none"])
    )
    micros = (
        [micro]
        if micro
        else [m for m in range(min(effective, MAX_MICRO), 0, -1) if effective % m == 0]
    )
    if mem.free is None:
        m = micro or default_micro or micros[0]
        m = m if effective % m == 0 else 1
        return StepPlan(
            m,
            effective // m,
            checkpointing or "none",
            "none",
            None,
            None,
            ["no GPU: nothing to plan against, the spec's batch and no checkpointing"],
        )
    budget = mem.free * (1 - MARGIN_FRACTION) - MARGIN_BYTES
    best: tuple[float, str, str, int] | None = None
    for q in quants:
        for mode in modes:
            for m in micros:
                if total_bytes(mem, q, mode, m) <= budget:
                    speed = QUANT_SPEED[q] * MODE_SPEED[mode] * m / (m + 1)
                    if best is None or speed > best[0]:
                        best = (speed, q, mode, m)
                    break  # the largest fitting m of this mode
    reasons = [f"budget {budget / GIB:.1f} GiB of {mem.free / GIB:.1f} GiB free"]
    if best is None:
        q, mode, m = quants[-1], modes[-1], micros[-1]
        reasons.append("nothing fits by the estimate: the smallest plan")
    else:
        _, q, mode, m = best
        reasons.append(f"fastest fitting: est. {total_bytes(mem, q, mode, m) / GIB:.1f} GiB")
    for name, given in (("micro_batch_size", micro), ("checkpointing", checkpointing)):
        if given:
            reasons.append(f"{name} {given} from the spec")
    if quantization == "auto":
        fits = total_bytes(mem, "none", modes[-1], micros[-1]) <= budget
        why = "bf16 fits" if q == "none" else "NF4 is faster here" if fits else "bf16 won't fit"
        reasons.append(f"quantization auto: {why}")
    return StepPlan(
        m,
        effective // m,
        mode,
        q,
        round(total_bytes(mem, q, mode, m) / GIB, 2),
        round(mem.free / GIB, 2),
        reasons,
    )


def model_memory(config: Any, lora_r: int, tokens: int, free: float | None) -> MemoryInputs:
    """The figures `choose` needs for a model of `config` (parameter counts on the meta device,
    no weights) training examples of `tokens` tokens with LoRA rank `lora_r`."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        meta = AutoModelForImageTextToText.from_config(config)
    text = config.get_text_config()
    decoder = meta.get_decoder()
    linears = [m for m in decoder.modules() if isinstance(m, torch.nn.Linear)]
    # What NF4 quantizes: the language model's linear layers (trainer.model.NF4_SKIP).
    linear = sum(m.weight.numel() for m in linears)
    total = sum(p.numel() for p in meta.parameters())
    lora = sum(lora_r * (m.in_features + m.out_features) for m in linears)
    return MemoryInputs(
        free=free,
        # NF4: 4 bits per language-model linear weight plus ~0.127 bits of double-quantized
        # block constants; peft's prepare_model_for_kbit_training casts the rest to fp32.
        weights={"nf4": linear * 4.127 / 8 + (total - linear) * 4, "none": total * 2.0},
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        tokens=tokens,
        fixed=lora * 16.0 + GIB,  # fp32 adapter, gradient and two AdamW moments; CUDA context
    )


def measure(spec: Any, device: Any, labels: list[str], example: Any) -> MemoryInputs:
    """The figures `choose` needs, for this spec's model on `device`, before any weight loads:
    parameter counts from the config, one real example's tokens, the GPU's free memory."""
    import torch
    from transformers import AutoConfig

    from trainer.collator import TrainCollator
    from trainer.model import load_processor

    processor = load_processor(spec.model_id)
    batch = TrainCollator(processor, labels, spec.max_length)([example])
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    return model_memory(
        AutoConfig.from_pretrained(spec.model_id),
        spec.lora_r,
        int(batch["attention_mask"][0].sum()),
        float(free) if free is not None else None,
    )


def plan_run(spec: Any, device: Any, labels: list[str], example: Any) -> StepPlan:
    mem = measure(spec, device, labels, example)
    return choose(
        spec.effective_batch_size,
        mem,
        micro=None if spec.micro_batch_size == "auto" else spec.micro_batch_size,
        checkpointing=None if spec.checkpointing == "auto" else spec.checkpointing,
        allow_checkpointing=spec.gradient_checkpointing,
        quantization=spec.quantization,
        default_micro=spec.batch_size,
    )


def apply_checkpointing(model: Any, mode: str) -> None:
    """Checkpoint the decoder's layers: all (`full`), every other one (`selective`), none.
    transformers' layers checkpoint when their `gradient_checkpointing` flag is set; enabling
    sets it on every layer, so `selective` clears it on the odd ones."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if mode == "none":
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "selective":
        decoder = model.get_decoder().modules()
        layers = [m for m in decoder if isinstance(m, GradientCheckpointingLayer)]
        for layer in layers[1::2]:
            layer.gradient_checkpointing = False
