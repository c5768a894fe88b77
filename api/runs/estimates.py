"""Estimate a run's GPU memory, time and cost from its spec, before anything is dispatched
(docs/architecture.md, "Data flow", step 1). A spec whose estimate does not fit its GPU is refused
at submission, which is far cheaper than an out-of-memory kill twenty minutes into a Cloud Run
execution.

The model's size comes from its config.json when the create-run check could read it
(`arch_from_config`: a local directory, or the Hub), else from its id: the families the trainer
supports are known (`KNOWN`, from their public configs); any other id that names its size
(`...-7B-...`, `...-256M-...`) gets a generic decoder architecture inferred from the parameter
count; an id that names no size and has no readable config gets no estimate and is never
refused.

The memory model (api/runs/memory.py) is the trainer's, at the spec's own settings: NF4 decoder
layers with everything else upcast to fp32, LoRA adapters with AdamW in fp32, activations under
the checkpointing mode, the output head's bf16 copy and the answer tokens' logits, and the
evaluation's peak; it is checked against the H200 measurements in bench/results
(tests/api/runs/test_memory_measured.py). Time is calibrated on the published
Gemma 3 27B figures on one RTX PRO 6000 (1,000 / 2,500 / 3,600 samples in 1.1 / 2.3 / 3.3 h,
500 evaluation samples each side); the L4 figures are scaled by its peak bf16 throughput and
memory bandwidth. Evaluation follows the spec's `eval_mode` (label scoring reads each prompt
once; generation adds token-by-token decoding: `_one_eval`). A run needs one execution per
segment of work, each loading the model again; a segment is what the worker gives an execution
(`api.dispatch.base.segment_length`: the time budget, capped by Cloud Run's task timeout).
Prices are Cloud Run list prices (us-central1, no zonal redundancy) at the
time of writing; they go stale: check https://cloud.google.com/run/pricing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, Field

from api.runs import memory as mem
from api.runs.memory import GIB
from api.runs.model_archs import KNOWN, Arch, model_size
from trainer.contract.spec import RunSpec

__all__ = ["KNOWN", "Estimate", "estimate", "model_size", "refusal_detail"]

# The least room a prompt needs beside the image (a max_length below image + this is refused).
MIN_PROMPT_TOKENS = 64


@dataclass(frozen=True)
class Gpu:
    label: str
    memory_gib: float  # what a process can allocate, not the marketing figure
    train_tflops: float  # effective for QLoRA training (calibrated, not the peak)
    bandwidth_gbs: float  # memory bandwidth, GB/s: bounds token-by-token generation
    vcpu: int  # Cloud Run's minimum CPU and memory for this GPU (docs/architecture.md, "Data flow")
    memory_gib_host: int
    gpu_usd_per_second: float


# CPU and memory prices of a Cloud Run instance with a GPU (instance-based billing).
VCPU_USD_PER_SECOND = 0.000018
HOST_GIB_USD_PER_SECOND = 0.000002

GPUS: dict[str, Gpu] = {
    # 24 GB card; nvidia-smi shows 23,034 MiB of which the driver keeps a little.
    "nvidia-l4": Gpu("NVIDIA L4 (24 GB)", 22.0, 14.0, 300, 4, 16, 0.0001867),
    # 96 GB card; 97,887 MiB visible.
    "nvidia-rtx-pro-6000": Gpu("NVIDIA RTX PRO 6000 (96 GB)", 94.0, 37.5, 1792, 20, 80, 0.00055),
}


class MemoryEstimate(BaseModel):
    weights_gib: float = Field(
        description="NF4: 4-bit decoder layers, the rest (embeddings, head, vision tower, "
        "projector) in fp32; none: all bf16"
    )
    adapters_gib: float = Field(description="LoRA weights, gradients and AdamW state (fp32)")
    activations_gib: float = Field(description="kept for the backward pass of one micro-batch")
    logits_gib: float = Field(
        description="the output head's bf16 copy (NF4) and the answer tokens' logits"
    )
    eval_gib: float | None = Field(None, description="the evaluation's peak, before overhead")
    overhead_gib: float = Field(description="CUDA context, allocator fragmentation")
    total_gib: float = Field(description="the larger of training's and evaluation's peak")
    gpu_gib: float = Field(description="what the GPU can allocate")
    instance_gib: float | None = Field(
        None, description="the instance's (host) memory the task needs, in-memory disk included"
    )
    instance_limit_gib: float | None = Field(None, description="the instance's memory")


class TimeEstimate(BaseModel):
    load_seconds: float = Field(description="download and quantize the model, per segment")
    train_seconds: float
    eval_seconds: float = Field(
        description="baseline and final evaluation, by the spec's eval_mode"
    )
    segment_seconds: float = Field(
        description="the longest one execution may run: the spec's time budget, or the "
        "dispatcher's cap (Cloud Run's task timeout less the margin) when shorter"
    )
    segments: int = Field(
        description="executions needed, each at most one segment long; 0: a segment is too "
        "short to load the model and save a checkpoint"
    )
    total_seconds: float


class Estimate(BaseModel):
    model_id: str
    gpu_type: str
    parameters: int | None = Field(description="null: the model id names no size")
    architecture: str | None = Field(
        description="a known config, or `inferred` from the parameter count"
    )
    trainable_parameters: int | None
    memory: MemoryEstimate | None
    time: TimeEstimate | None
    cost_usd: float | None = Field(description="GPU, CPU and memory of all segments")
    usd_per_hour: float
    fits: bool | None = Field(description="null when unknown; false refuses the run")
    notes: list[str]


def estimate(spec: RunSpec, segment: timedelta, config: dict[str, Any] | None = None) -> Estimate:
    """`segment`: how long one execution may run, `api.dispatch.base.segment_length` (the
    worker's own deadline), so that a budget over the dispatcher's cap counts its segments."""
    gpu = GPUS[spec.gpu_type]
    usd_per_second = (
        gpu.gpu_usd_per_second
        + gpu.vcpu * VCPU_USD_PER_SECOND
        + gpu.memory_gib_host * HOST_GIB_USD_PER_SECOND
    )
    params, arch = model_size(spec.model_id, config)
    if params is None or arch is None:
        return Estimate(
            model_id=spec.model_id,
            gpu_type=spec.gpu_type,
            parameters=None,
            architecture=None,
            trainable_parameters=None,
            memory=None,
            time=None,
            cost_usd=None,
            usd_per_hour=round(usd_per_second * 3600, 2),
            fits=None,
            notes=[
                "the model id names no size, so memory, time and cost are unknown; "
                "a Hub id like 'google/gemma-3-4b-it' gets an estimate"
            ],
        )
    memory, trainable = _memory(spec, arch, gpu)
    host = instance_memory_gib(spec, memory, params)
    memory = memory.model_copy(
        update={"instance_gib": host, "instance_limit_gib": float(gpu.memory_gib_host)}
    )
    time = _time(spec, arch, gpu, params, segment)
    fits, notes = _verdict(spec, arch, gpu, memory, host, time, segment)
    return Estimate(
        model_id=spec.model_id,
        gpu_type=spec.gpu_type,
        parameters=params,
        architecture=arch.name,
        trainable_parameters=trainable,
        memory=memory,
        time=time,
        cost_usd=round(time.total_seconds * usd_per_second, 2),
        usd_per_hour=round(usd_per_second * 3600, 2),
        fits=fits,
        notes=notes,
    )


def _verdict(
    spec: RunSpec,
    arch: Arch,
    gpu: Gpu,
    memory: MemoryEstimate,
    host: float,
    time: TimeEstimate,
    segment: timedelta,
) -> tuple[bool, list[str]]:
    """(whether the run fits: False refuses it, the notes that say why and what else to know)."""
    notes = []
    if not arch.exact:
        notes.append("architecture inferred from the parameter count: a rough estimate")
    if time.segments > 1:
        notes.append(
            f"needs {time.segments} executions of at most {time.segment_seconds / 60:g} min; "
            "each resumes from the previous one's checkpoint and reloads the model"
        )
    fits = memory.total_gib <= memory.gpu_gib and host <= gpu.memory_gib_host
    if host > gpu.memory_gib_host:
        notes.append(instance_note(spec, host, gpu.memory_gib_host))
    if arch.image_tokens and spec.max_length < arch.image_tokens + MIN_PROMPT_TOKENS:
        # The trainer would stop at its first batch (PromptTooLong): refuse it here instead.
        fits = False
        notes.append(too_short_note(spec, arch))
    if time.segments == 0:
        # Each execution would load the model and save, and train nothing: with the spec's own
        # budget as the segment, refuse it (a longer budget fixes it); under the server's cap
        # (a demo's TUNEPLANE_SEGMENT_SECONDS_MAX) the operator chose it, so only say so.
        own_budget = segment >= timedelta(minutes=spec.time_budget_minutes)
        fits = fits and not own_budget
        notes.append(short_segment_note(time, own_budget))
    return fits, notes


def _memory(spec: RunSpec, arch: Arch, gpu: Gpu) -> tuple[MemoryEstimate, int]:
    """api/runs/memory.py's model at the spec's own settings; `quantization: auto` is the smaller
    of NF4 and bf16 (the trainer takes bf16 only where it fits, and for a mixture of experts
    NF4, which leaves the experts in fp32, is the larger)."""
    m = min((mem.memory(spec, arch, p) for p in mem.plans(spec)), key=lambda x: x.total)
    memory = MemoryEstimate(
        weights_gib=_gib(m.weights),
        adapters_gib=_gib(m.adapters),
        activations_gib=_gib(m.activations),
        logits_gib=_gib(m.head),
        eval_gib=_gib(m.evaluation),
        overhead_gib=_gib(m.overhead),
        total_gib=_gib(m.total),
        gpu_gib=gpu.memory_gib,
    )
    return memory, mem.lora_params(spec, arch) + arch.projector_params


def _time(spec: RunSpec, arch: Arch, gpu: Gpu, params: int, segment: timedelta) -> TimeEstimate:
    flops_rate = gpu.train_tflops * 1e12
    tokens = spec.max_length  # an upper bound: real examples are often shorter
    passes = 8 if spec.gradient_checkpointing else 6  # forward, backward (+ recomputation)
    train = passes * params * tokens * spec.train_size * spec.num_epochs / flops_rate
    evals = 2 * _one_eval(spec, gpu, params, flops_rate)
    # Downloading bf16 weights at ~500 MB/s, then quantizing them (~2 s per billion).
    load = params * 2 / 500e6 + params / 1e9 * 2 + 20
    work = train + evals
    # Every execution loads the model again; a minute to checkpoint and upload.
    usable = segment.total_seconds() - load - 60
    segments = max(1, math.ceil(work / usable)) if usable > 0 else 0
    total = work + max(segments, 1) * load
    return TimeEstimate(
        load_seconds=round(load),
        train_seconds=round(train),
        eval_seconds=round(evals),
        segment_seconds=round(segment.total_seconds()),
        segments=segments,
        total_seconds=round(total),
    )


def _one_eval(spec: RunSpec, gpu: Gpu, params: int, flops_rate: float) -> float:
    """One evaluation pass over `eval_size` samples. Every sample's prompt is read in one
    forward (compute-bound). `generate` then decodes the answer token by token, each step
    reading every weight (memory-bound; ~30% of peak bandwidth with 4-bit dequantization).
    `score` (trainer/scoring.py) decodes nothing: one forward over the label tree (~150 tokens
    for 37 labels, trainer/label_tree.py) on the prompt's cache, inside the max_length bound
    counted here, so a sample costs about one prefill.

    Measured on an H200, Gemma 3 4B architecture (bench/results/gpu_trainer_v4/4b-8steps/
    bench.log, `python3 bench/gpu_trainer.py --config 4b --steps 8 --eval-size 256`; v3's
    figures evaluated 148 samples, not 256, bench/results/gpu_trainer_v4/README.md): scoring
    in batches of 32 over 256 samples ran 17.76 / 40.56 samples/s (baseline / final
    evaluation) with NF4 weights, 23.16 / 58.27 in bf16; generation in batches of 1 (the
    "original" setting: 8 samples, 8 new tokens, NF4) 0.77 / 4.28, so 23x / 9.5x. The batch
    size differs as well as the mode, so that ratio is not this model's to reproduce (for
    gemma-3-4b-it, eval_size 256, max_new_tokens 8 on an RTX PRO 6000 this function gives
    78 s at batch 1 against scoring's 60 s at 32, 1.3x: it errs short for generation at
    batch 1, which nothing defaults to). Scoring reached 345 TFLOP/s there against training's
    164 (NF4; 210 bf16): counted at the training rate, as here, a scoring evaluation errs long
    (about 2x)."""
    prefill = 2 * params * spec.max_length * spec.eval_size / flops_rate
    if spec.eval_mode == "score":
        return prefill
    weight_bytes = params * 0.55
    batches = math.ceil(spec.eval_size / spec.eval_batch_size)
    step = weight_bytes / (gpu.bandwidth_gbs * 1e9 * 0.3)
    return prefill + batches * spec.max_new_tokens * step


# -- instance memory (Cloud Run) -----------------------------------------------------------------
# A Cloud Run instance's file system is in memory and "counts against" its memory
# (https://cloud.google.com/run/docs/container-contract#filesystem). The Job keeps the Hugging
# Face cache on a bucket mount (api/dispatch/cloudrun_job.py), which stages one file at a time
# in memory while it is written; loading then reads one shard at a time to quantize it. A model
# whose files sit on the in-memory disk itself (a path under /tmp) has all of them in memory.
HOST_BASE_GIB = 6.0  # Python, torch, CUDA host libraries, processor, data set: a rough figure
SHARD_BYTES = 5e9  # transformers' default max_shard_size ("5GB")
IN_MEMORY_DISK = "/tmp/"


def instance_memory_gib(spec: RunSpec, memory: MemoryEstimate, params: int) -> float:
    weights = params * 2  # bf16 files
    resident = weights if spec.model_id.startswith(IN_MEMORY_DISK) else 0.0
    # One file at a time: staged while it is downloaded, then (later) one shard while it is
    # quantized; the two do not overlap.
    shard = min(weights, SHARD_BYTES)
    checkpoint = memory.adapters_gib * GIB  # adapters and optimizer state on the in-memory disk
    return _gib(HOST_BASE_GIB * GIB + resident + shard + checkpoint)


def instance_note(spec: RunSpec, need: float, have: int) -> str:
    where = (
        "its weights sit on the in-memory disk (/tmp); load it from the bucket mount "
        "(/mnt/bucket/...) or by Hub id (cached on the bucket)"
        if spec.model_id.startswith(IN_MEMORY_DISK)
        else "pick the GPU type with more instance memory"
    )
    return (
        f"needs about {need:g} GiB of instance memory; a {spec.gpu_type} instance has {have} GiB "
        f"(Cloud Run's in-memory disk counts against it): {where}"
    )


def too_short_note(spec: RunSpec, arch: Arch) -> str:
    return (
        f"max_length {spec.max_length} cannot hold one image ({arch.image_tokens} tokens in "
        f"{arch.name}) and the prompt: raise max_length to at least "
        f"{arch.image_tokens + MIN_PROMPT_TOKENS}"
    )


def short_segment_note(time: TimeEstimate, own_budget: bool) -> str:
    """Why no segment trains anything; `own_budget`: the segment is the spec's time budget."""
    note = (
        f"a segment ({time.segment_seconds:g} s) is shorter than loading the model "
        f"({time.load_seconds:g} s) and a minute to save a checkpoint: no step would run"
    )
    if not own_budget:
        return f"{note} (the server caps segments at that length)"
    least = math.floor((time.load_seconds + 60) / 60) + 1
    return f"{note}; raise time_budget_minutes to at least {least}"


def _gib(value: float) -> float:
    return round(value / GIB, 1)


# The spec fields a refusal that is not for memory names, in the order they are blamed.
REFUSING_FIELDS = ("max_length", "time_budget_minutes")


def culprit(notes: list[str]) -> str | None:
    """The spec field to blame for a refusal when memory fits: the first of
    `REFUSING_FIELDS` that a note names, or None."""
    return next((f for f in REFUSING_FIELDS if any(f in n for n in notes)), None)


def refusal_detail(spec: RunSpec, est: Estimate, segment: timedelta) -> str:
    """Why a run does not fit, and what would make it fit (`segment` as for `estimate`)."""
    assert est.memory is not None
    need, have = est.memory.total_gib, est.memory.gpu_gib
    host, limit = est.memory.instance_gib, est.memory.instance_limit_gib
    if need <= have and host is not None and limit is not None and host > limit:
        return instance_note(spec, host, int(limit))  # the GPU is not the problem
    if need <= have:  # refused for what max_length cannot hold or a segment too short
        return f"{spec.model_id}: " + "; ".join(n for n in est.notes if culprit([n]))
    parts = [
        f"{spec.model_id} on {spec.gpu_type} needs about {need:g} GiB of GPU memory; "
        f"the GPU has {have:g} GiB"
    ]
    for bs in (bs for bs in (64, 32, 16, 8, 4, 2, 1) if bs < spec.batch_size):
        smaller = spec.model_copy(update={"batch_size": bs})
        if estimate(smaller, segment).fits:
            accum = math.ceil(spec.effective_batch_size / bs)
            parts.append(
                f"batch_size {bs} with gradient_accumulation_steps {accum} would fit "
                "(same effective batch)"
            )
            break
    if (
        spec.quantization == "nf4"
        and estimate(spec.model_copy(update={"quantization": "none"}), segment).fits
    ):
        # A mixture of experts: bitsandbytes leaves its 3-D expert weights alone, then peft's
        # k-bit preparation makes them fp32 (api/runs/memory.py), twice their bf16 size.
        parts.append("quantization 'none' would fit: NF4 keeps this model's experts in fp32")
    for other in GPUS:
        other_gpu = spec.model_copy(update={"gpu_type": other})
        if other != spec.gpu_type and estimate(other_gpu, segment).fits:
            parts.append(f"gpu_type {other!r} would fit as it is")
    if len(parts) == 1:
        parts.append("no batch size or GPU makes it fit: lower max_length or pick a smaller model")
    return "; ".join(parts)
