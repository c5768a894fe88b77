"""Candidate speed-ups for issue 16, each measured against the plain path in one process on
the GPU (Gemma 3 4B architecture, random weights, the bench's own images; bench/gpu_trainer.py
builds both). What it answers, per weight kind (bf16 / NF4, the auto plan's 16 x 1, no
checkpointing):

- contention: a training step with its batch ready, alone and with the next batch being
  collated in a thread (the trainer's prefetch) -- what the collation costs the GPU's feed;
- collate: where the collator's CPU time goes (image decoding vs the processor);
- liger: the step with Liger's Gemma 3 kernels (RMSNorm, GeGLU, RoPE) against the plain step,
  and the loss of the same batch under both (they must agree);
- compile: the frozen vision tower's images/s eager and under torch.compile (and its compile
  time);
- eval: one label-scoring batch of 32: the CPU preparation against the GPU's two forwards;
- memo: whole scoring passes over cached images, with and without trainer.scoring.Memo;
- --equivalence: the loss and LoRA gradients of one batch, plain and fused (trainer.kernels).

    python3 bench/gpu_experiments.py --quantization auto    # then nf4; $OUT gets the JSON
    python3 bench/gpu_experiments.py --equivalence --quantization auto
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.gpu_trainer import PET_BREEDS, build_images, build_model  # noqa: E402


def _sync_time(fn: Any, repeat: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def _load(
    model_dir: Path, data_dir: Path, quantization: str, flags: list[str] | None = None
) -> tuple[Any, Any, Any]:
    from trainer import data, model
    from trainer.contract.spec import RunSpec
    from trainer.plan import plan_run

    spec = RunSpec.from_flags([
        "--model-id", str(model_dir), "--dataset", f"imagefolder:{data_dir}",
        "--batch-size", "8", "--gradient-accumulation-steps", "2", "--max-length", "1024",
        # Plain kernels unless `flags` say otherwise: each experiment fuses where it measures.
        "--quantization", quantization, "--kernels", "plain", *(flags or []),
    ])  # fmt: skip
    splits = data.load_splits(spec.data, 128, 64, 0)
    device = torch.device("cuda")
    loaded = model.load(spec, device, plan_run(spec, device, splits.labels, splits.train[0]))
    return loaded, spec, splits


def _step(loaded: Any, inputs: dict[str, Any], params: list[Any], opt: Any) -> float:
    from trainer.loss import training_loss

    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = training_loss(loaded.model, inputs, True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def contention(loaded: Any, spec: Any, splits: Any, micro: int) -> dict[str, Any]:
    from trainer.collator import TrainCollator
    from trainer.device import to_device

    collate = TrainCollator(loaded.processor, splits.labels, spec.max_length)
    chunks = [splits.train[i * micro : (i + 1) * micro] for i in range(len(splits.train) // micro)]
    batches = [to_device(collate(c), loaded.device, torch.bfloat16) for c in chunks[:2]]
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    loaded.model.train()
    _step(loaded, batches[0], params, opt)  # warm-up
    steps = 4
    alone = _sync_time(lambda: _step(loaded, batches[1], params, opt), steps)
    t0 = time.perf_counter()
    collate(chunks[2])
    collate_s = time.perf_counter() - t0
    with ThreadPoolExecutor(max_workers=1) as pool:

        def with_collation() -> None:
            f = pool.submit(collate, chunks[3])
            _step(loaded, batches[1], params, opt)
            f.result()

        beside = _sync_time(with_collation, steps)
    # Where the collator's time goes: decoding the images, or the processor.
    t0 = time.perf_counter()
    images = [[s.image()] for s in chunks[2]]
    decode_s = time.perf_counter() - t0
    fmt = collate.format
    t0 = time.perf_counter()
    loaded.processor(
        text=[fmt.prompt + fmt.answer_text(s.label) for s in chunks[2]],
        images=images,
        padding=True,
        padding_side="right",
        return_tensors="pt",
    )
    processor_s = time.perf_counter() - t0
    return {
        "step_ms_per_sample_alone": round(alone * 1e3 / micro, 2),
        "step_ms_per_sample_beside_collation": round(beside * 1e3 / micro, 2),
        "collate_ms_per_sample": round(collate_s * 1e3 / micro, 2),
        "decode_ms_per_sample": round(decode_s * 1e3 / micro, 2),
        "processor_ms_per_sample": round(processor_s * 1e3 / micro, 2),
        "torch_threads": torch.get_num_threads(),
    }


def liger(loaded: Any, spec: Any, splits: Any, micro: int) -> dict[str, Any]:
    from trainer import kernels
    from trainer.collator import TrainCollator
    from trainer.device import to_device
    from trainer.loss import training_loss

    collate = TrainCollator(loaded.processor, splits.labels, spec.max_length)
    inputs = to_device(collate(splits.train[:micro]), loaded.device, torch.bfloat16)
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)  # lr 0: the weights stay, so both losses are comparable
    loaded.model.train()
    torch.manual_seed(0)

    def loss_now() -> float:
        torch.manual_seed(0)  # the same LoRA dropout masks
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return float(training_loss(loaded.model, inputs, True))

    _step(loaded, inputs, params, opt)
    plain = _sync_time(lambda: _step(loaded, inputs, params, opt), 3)
    plain_loss = loss_now()
    kernels.fuse(loaded.model.get_base_model(), loaded.device, "auto")
    _step(loaded, inputs, params, opt)
    fused = _sync_time(lambda: _step(loaded, inputs, params, opt), 3)
    return {
        "plain_step_ms_per_sample": round(plain * 1e3 / micro, 2),
        "liger_step_ms_per_sample": round(fused * 1e3 / micro, 2),
        "ratio": round(plain / fused, 3),
        "plain_loss": plain_loss,
        "liger_loss": loss_now(),
    }


def kernel_equivalence(
    model_dir: Path, data_dir: Path, quantization: str, checkpointing: str = "none"
) -> dict[str, Any]:
    """The loss and the LoRA gradients of one batch, plain and with trainer.kernels' fused
    kernels, on the same weights (LoRA dropout off: no random masks to line up). Relative
    error of the loss, and of every trainable tensor's gradient (the largest, and over all of
    them at once); tests/trainer/test_gpu_kernels.py holds them to a bound."""
    from trainer import kernels
    from trainer.collator import TrainCollator
    from trainer.device import to_device
    from trainer.loss import training_loss

    loaded, spec, splits = _load(
        model_dir,
        data_dir,
        quantization,
        ["--kernels", "plain", "--lora-dropout", "0", "--checkpointing", checkpointing],
    )
    collate = TrainCollator(loaded.processor, splits.labels, spec.max_length)
    inputs = to_device(collate(splits.train[:4]), loaded.device, torch.bfloat16)
    model = loaded.model
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def loss_and_grads() -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = training_loss(model, inputs, True)
        loss.backward()
        return float(loss.detach()), [p.grad.float().clone() for _, p in named]  # type: ignore[union-attr]

    plain_loss, plain = loss_and_grads()
    fused_as = kernels.fuse(model.get_base_model(), loaded.device, "auto")
    fused_loss, fused = loss_and_grads()
    errors = [
        float((b - a).norm() / a.norm().clamp_min(1e-12)) for a, b in zip(plain, fused, strict=True)
    ]
    total = float(
        torch.sqrt(sum(((b - a) ** 2).sum() for a, b in zip(plain, fused, strict=True)))
        / torch.sqrt(sum((a**2).sum() for a in plain))
    )
    worst = max(range(len(errors)), key=errors.__getitem__)
    return {
        "kernels": fused_as,
        "checkpointing": checkpointing,
        "plain_loss": plain_loss,
        "fused_loss": fused_loss,
        "loss_relative_error": abs(fused_loss - plain_loss) / abs(plain_loss),
        "gradient_relative_error_all": total,
        "gradient_relative_error_max": errors[worst],
        "gradient_worst_tensor": named[worst][0],
        "trainable_tensors": len(named),
    }


def compiled_tower(loaded: Any, batch: int) -> dict[str, Any]:
    from trainer.features import vision_tower

    tower = vision_tower(loaded.model)
    assert tower is not None
    size = tower.config.image_size
    pixels = torch.randn(batch, 3, size, size, device=loaded.device, dtype=torch.bfloat16)

    def run(fn: Any) -> Any:
        with torch.inference_mode():
            return fn(pixel_values=pixels)

    run(tower)
    eager = _sync_time(lambda: run(tower), 3)
    compiled = torch.compile(tower)
    t0 = time.perf_counter()
    run(compiled)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    fast = _sync_time(lambda: run(compiled), 3)
    return {
        "eager_images_per_second": round(batch / eager, 1),
        "compiled_images_per_second": round(batch / fast, 1),
        "compile_seconds": round(compile_s, 1),
    }


def eval_split(loaded: Any, spec: Any, splits: Any, batch: int) -> dict[str, Any]:
    from trainer import scoring
    from trainer.collator import TrainCollator
    from trainer.device import autocast, to_device

    chunk = splits.eval[:batch]
    memo = scoring.Memo()
    train_collator = TrainCollator(loaded.processor, splits.labels, spec.max_length)
    # No feature cache: both calls decode and process the images (the second is timed).
    scoring._prepared(loaded.processor, splits.labels, train_collator, memo, None, chunk)
    t0 = time.perf_counter()
    groups = scoring._prepared(loaded.processor, splits.labels, train_collator, memo, None, chunk)
    prep = time.perf_counter() - t0
    rows, cpu_batch, cont = groups[0]
    inputs = to_device(cpu_batch, loaded.device, torch.bfloat16)
    loaded.model.eval()

    def score() -> None:
        with torch.inference_mode(), autocast(loaded.device):
            scoring.score_batch(loaded.model, inputs, cont, loaded.device)

    score()
    gpu = _sync_time(score, 3)
    loaded.model.train()
    return {
        "batch": len(rows),
        "prep_ms_per_sample": round(prep * 1e3 / len(rows), 2),
        "score_ms_per_sample_with_vision": round(gpu * 1e3 / len(rows), 2),
        "tree_tokens": len(cont.tree.tokens),
    }


def memo_passes(loaded: Any, spec: Any, splits: Any, batch: int) -> dict[str, Any]:
    """Three scoring passes over the same samples with the frozen tower's cache: the first
    encodes the images; the second keeps the first's Memo (no image decoded), the third starts
    a fresh one (every image decoded and processed, the tower's outputs still cached). Second
    against third is what Memo is worth, in one process."""
    from trainer import scoring
    from trainer.evaluate import EVAL_FEATURE_BYTES
    from trainer.features import FeatureCache

    cache = FeatureCache.for_model(loaded.model, max_bytes=EVAL_FEATURE_BYTES)
    memo = scoring.Memo()
    kwargs: dict[str, Any] = dict(
        max_length=spec.max_length, device=loaded.device, batch_size=batch, features=cache
    )
    seconds = []
    for pass_memo in (memo, memo, scoring.Memo()):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        scoring.score_labels(
            loaded.model, loaded.processor, splits.labels, splits.eval, memo=pass_memo, **kwargs
        )
        seconds.append(time.perf_counter() - t0)
    n = len(splits.eval)
    return {
        "samples": n,
        "first_pass_samples_per_second": round(n / seconds[0], 1),
        "cached_with_memo_samples_per_second": round(n / seconds[1], 1),
        "cached_decoding_samples_per_second": round(n / seconds[2], 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/tuneplane-bench"))
    parser.add_argument("--skip-compile", action="store_true")
    # One weight kind a process: Liger patches transformers' Gemma 3 classes for the process.
    parser.add_argument("--quantization", choices=["auto", "nf4"], default="auto")
    parser.add_argument("--equivalence", action="store_true", help="only the kernels' check")
    parser.add_argument("--only", nargs="*", help="these experiments only (e.g. memo)")
    parser.add_argument("--checkpointing", default="none", help="for --equivalence")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT") or args.work_dir / "out")
    out.mkdir(parents=True, exist_ok=True)
    model_dir = args.work_dir / "gemma3-4b-random"
    build_model(model_dir, "4b")
    data_dir = build_images(args.work_dir / "images", -(-128 // len(PET_BREEDS)), 2)
    if args.equivalence:
        check = kernel_equivalence(model_dir, data_dir, args.quantization, args.checkpointing)
        print(json.dumps(check), flush=True)
        suffix = "" if args.checkpointing == "none" else f"-{args.checkpointing}"
        name = f"gpu_kernel_equivalence-{args.quantization}{suffix}.json"
        (out / name).write_text(json.dumps(check, indent=1))
        return 0
    results: dict[str, Any] = {}
    loaded, spec, splits = _load(model_dir, data_dir, args.quantization)
    micro = loaded.plan.micro_batch
    name = "bf16" if not loaded.quantized else "nf4"
    experiments = {
        "contention": lambda: contention(loaded, spec, splits, micro),
        "eval": lambda: eval_split(loaded, spec, splits, 32),
        "memo": lambda: memo_passes(loaded, spec, splits, 32),
        "compile": lambda: compiled_tower(loaded, 16),
        "liger": lambda: liger(loaded, spec, splits, micro),  # last: it patches the model
    }
    if args.skip_compile or name != "bf16":
        del experiments["compile"]
    if args.only:
        experiments = {k: v for k, v in experiments.items() if k in args.only}
    for what, run in experiments.items():
        try:
            results[f"{name}/{what}"] = run()
        except Exception as e:  # an experiment that fails says why; the others go on
            results[f"{name}/{what}"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(f"{name}/{what}", json.dumps(results[f"{name}/{what}"]), flush=True)
        (out / f"gpu_experiments-{args.quantization}.json").write_text(
            json.dumps(results, indent=1)
        )
    for key, value in results.items():
        print(f"{key:16} {json.dumps(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
