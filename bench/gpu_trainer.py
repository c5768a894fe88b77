"""Speed and memory of the trainer on a Gemma-3-4B-architecture model: the original settings, the
step plan (NF4 and `quantization: auto`), and where a step's time goes.

    pip install -e '.[trainer]'                # where the trainer's packages are missing
    python bench/gpu_trainer.py                # NVIDIA GPU (H200: about 5 minutes), writes $OUT
    python bench/gpu_trainer.py --config tiny  # the same flow on CPU, in a minute or two

Builds a `Gemma3ForConditionalGeneration` with the 4B architecture (random weights; the Hub is
out of reach), saves it locally in bf16 with a small word-level tokenizer and a Gemma3Processor
at 896 pixels, and writes an image-folder data set of 37 classes (named like the pet breeds, so
the prompt has the real length) of 500x375 JPEGs. Then, in this one process:

- the step breakdown (bench/step_profile.py) of the original settings and of the auto plan:
  per-sample milliseconds of data, vision forward, language forward, backward and optimizer,
  samples/s, tokens/s, MFU from counted FLOPs, peak memory;
- the trainer itself (`trainer.cli.main`: load -> baseline eval -> training -> final eval ->
  save) in three settings: "original" (the original script's: batch 1 x accumulation 16, full
  gradient checkpointing, free generation one sample at a time), "auto" (the same 16 samples
  per optimizer step split by the step plan, NF4, label scoring in batches of 32) and
  "auto-bf16" (the same with `--quantization auto`).

It prints samples/s for training and both evaluations, peak GPU memory (allocated and
reserved), the step plan and what the api's admission check (api/runs/estimates.py) predicts
for the real google/gemma-3-4b-it with that plan. Everything goes to `$OUT` when set (else
WORK_DIR/out): `gpu_trainer.json`, `gpu_trainer.md`, `profiles.json` and each run's
results.json. Random weights mean accuracy is meaningless here; speed and memory are not.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PET_BREEDS = [
    "Abyssinian", "American Bulldog", "American Pit Bull Terrier", "Basset Hound", "Beagle",
    "Bengal", "Birman", "Bombay", "Boxer", "British Shorthair", "Chihuahua", "Egyptian Mau",
    "English Cocker Spaniel", "English Setter", "German Shorthaired", "Great Pyrenees",
    "Havanese", "Japanese Chin", "Keeshond", "Leonberger", "Maine Coon", "Miniature Pinscher",
    "Newfoundland", "Persian", "Pomeranian", "Pug", "Ragdoll", "Russian Blue", "Saint Bernard",
    "Samoyed", "Scottish Terrier", "Shiba Inu", "Siamese", "Sphynx",
    "Staffordshire Bull Terrier", "Wheaten Terrier", "Yorkshire Terrier",
]  # fmt: skip


def gemma3_4b_configs() -> tuple[Any, Any, int, int]:
    """google/gemma-3-4b-it's architecture: (text config, vision config, tokens per image,
    image size)."""
    from transformers import Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        vocab_size=262_208,
        hidden_size=2560,
        intermediate_size=10_240,
        num_hidden_layers=34,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=131_072,
        rms_norm_eps=1e-6,
        sliding_window=1024,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    )
    vision = SiglipVisionConfig(  # SigLIP so400m at 896 pixels
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=896,
        patch_size=14,
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    return text, vision, 256, 896


def tiny_configs() -> tuple[Any, Any, int, int]:
    from transformers import Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=256,
    )
    vision = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        vision_use_head=False,
    )
    return text, vision, 16, 32


def build_model(path: Path, config_name: str) -> dict[str, Any]:
    """Write a random-weight Gemma 3 checkpoint in bf16 with a tokenizer and processor."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    from trainer import tiny

    if (path / "bench-model.json").exists():
        return json.loads((path / "bench-model.json").read_text())
    text, vision, tokens_per_image, image_size = (
        gemma3_4b_configs() if config_name == "4b" else tiny_configs()
    )
    tokenizer = tiny.build_tokenizer(tiny.vocabulary(PET_BREEDS))
    if len(tokenizer) > text.vocab_size:
        raise SystemExit(f"tokenizer ({len(tokenizer)}) larger than the vocabulary")
    processor = tiny.build_processor(tokenizer, image_size, tokens_per_image)
    config = tiny.gemma3_config(tokenizer, text, vision, tokens_per_image)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    # Built directly on the GPU in bf16: on CPU in fp32 the 4B model takes minutes to
    # initialise and 17 GB of memory.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Gemma3ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    tiny.init_projector(model)
    model.generation_config = tiny.generation_config(tokenizer)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    processor.save_pretrained(path)
    info = {"parameters": params, "build_and_save_seconds": round(time.perf_counter() - t0, 1)}
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    (path / "bench-model.json").write_text(json.dumps(info))
    return info


def build_images(root: Path, per_class_train: int, per_class_test: int) -> Path:
    """37 classes of 500x375 noise JPEGs (a typical Oxford-IIIT Pet photo size), so image
    decoding and resizing cost what they cost on the real data."""
    import numpy as np
    from PIL import Image

    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        for label in PET_BREEDS:
            folder = root / split / label.replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=85)
    (root / "done").write_text("")
    return root


SETTINGS: dict[str, dict[str, Any]] = {
    # The original script: batch 1, accumulation 16, checkpointing, one sample per generate().
    "original": {
        "batch": 1, "accum": 16, "eval_batch": 1, "steps": 1, "eval_size": 8,
        "flags": ["--micro-batch-size", "1", "--checkpointing", "full", "--eval-mode", "generate"],
    },
    # The same 16 samples per optimizer step, split by the step plan; label scoring.
    "auto": {"batch": 8, "accum": 2, "eval_batch": 32, "flags": []},
    "auto-bf16": {"batch": 8, "accum": 2, "eval_batch": 32, "flags": ["--quantization", "auto"]},
}  # fmt: skip


def estimated_gib(results: dict[str, Any], args: argparse.Namespace) -> float | None:
    """What the api's admission check (api/runs/estimates.py) predicts for google/gemma-3-4b-it
    with the spec and plan that ran (its micro-batch, checkpointing, weights and evaluation
    mode): the figure this bench exists to check. The api guesses the prompt's length from
    the data set (496 tokens here; the examples have ~465); tests/api/runs/test_memory_measured.py
    compares at the measured length."""
    plan = results.get("step_plan")
    if args.config != "4b" or not plan:
        return None
    from api.runs.estimates import estimate
    from trainer.contract.spec import RunSpec

    spec = RunSpec.model_validate({
        **results["spec"],
        "model_id": "google/gemma-3-4b-it",
        "micro_batch_size": plan["micro_batch"],
        "checkpointing": plan["checkpointing"],
        "quantization": plan["quantization"],
    })  # fmt: skip
    memory = estimate(spec).memory
    return None if memory is None else memory.total_gib


def run_setting(
    name: str,
    model_dir: Path,
    data_dir: Path,
    out: Path,
    args: argparse.Namespace,
    warmup: bool = False,
) -> dict[str, Any]:
    import torch

    from trainer.cli import main as trainer_main

    s = SETTINGS[name]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # The run's own output (adapter, checkpoints: hundreds of MB for 4B) stays in the work
    # directory, fresh each time so that nothing is resumed; only results.json goes to `out`.
    output_dir = args.work_dir / f"run-{name}"
    shutil.rmtree(output_dir, ignore_errors=True)
    argv = [
        "--model-id", str(model_dir),
        "--dataset", f"imagefolder:{data_dir}",
        "--train-size", str(16 * (1 if warmup else s.get("steps", args.steps))),
        "--eval-size", str(16 if warmup else s.get("eval_size", args.eval_size)),
        "--num-epochs", "1",
        "--learning-rate", "2e-4",
        "--batch-size", str(s["batch"]),
        "--gradient-accumulation-steps", str(s["accum"]),
        "--eval-batch-size", str(s["eval_batch"]),
        "--max-new-tokens", str(args.max_new_tokens),
        *s["flags"],
        "--save-steps", "1000000",
        "--max-length", "1024",
        "--output-dir", str(output_dir),
        "--device", "cuda" if torch.cuda.is_available() else "cpu",
    ]  # fmt: skip
    t0 = time.perf_counter()
    code = trainer_main(argv)
    wall = time.perf_counter() - t0
    results = json.loads((output_dir / "results.json").read_text())
    shutil.copyfile(output_dir / "results.json", out / f"results-{name}.json")
    if code != 0:
        raise SystemExit(f"{name}: the trainer failed: {results.get('error')}")
    tp = results["throughput"]
    gib = 2**30
    cuda = torch.cuda.is_available()
    return {
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 2) if cuda else None,
        "estimated_gib": estimated_gib(results, args),
        "baseline_eval_samples_per_second": results["baseline"]["samples_per_second"],
        "final_eval_samples_per_second": results["final"]["samples_per_second"],
        "setting": name,
        "batch_size": s["batch"],
        "gradient_accumulation_steps": s["accum"],
        "eval_batch_size": s["eval_batch"],
        "train_samples_per_second": tp["train_samples_per_second"],
        "step_plan": results.get("step_plan"),
        "eval_mode": results.get("eval_mode"),
        "weights": results["model"].get("weights"),
        "eval_samples_per_second": tp["eval_samples_per_second"],
        "peak_gpu_memory_gb": results["peak_gpu_memory_gb"],
        "timings": results["timings"],
        "steps": results["training"]["step"],
        "wall_seconds": round(wall, 1),
        "gpu": results["environment"]["gpu_name"],
    }


def table(rows: list[dict[str, Any]], profiles: list[dict[str, Any]]) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [
        "| setting | plan (micro x accum, checkpointing, weights) | eval | train samples/s "
        "| baseline eval samples/s | final eval samples/s | peak allocated GiB "
        "| peak reserved GiB | api estimate GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["step_plan"] or {}
        plan = f"{p.get('micro_batch')} x {p.get('accumulation')}, {p.get('checkpointing')}, "
        lines.append(
            f"| {r['setting']} | {plan}{r['weights']} | {r['eval_mode']} x{r['eval_batch_size']}"
            f" | {num(r['train_samples_per_second'], '.2f')} | "
            f"{num(r['baseline_eval_samples_per_second'], '.2f')} | "
            f"{num(r['final_eval_samples_per_second'], '.2f')} | "
            f"{num(r['peak_allocated_gib'], '.1f')} | {num(r['peak_reserved_gib'], '.1f')} | "
            f"{num(r['estimated_gib'], '.1f')} |"
        )
    a = rows[0]
    lines.append("")
    for b in rows[1:]:
        lines.append(
            f"{b['setting']} / {a['setting']}, same process: training "
            f"{b['train_samples_per_second'] / a['train_samples_per_second']:.2f}x, final "
            "evaluation "
            f"{b['final_eval_samples_per_second'] / a['final_eval_samples_per_second']:.2f}x"
        )
    lines += [
        "",
        "Step breakdown (ms per sample; CUDA events; data is CPU time, overlapped in the trainer)",
        "",
        "| setting | plan | samples/s | tokens/s | MFU | data | vision fwd | language fwd "
        "| backward | optimizer | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pr in profiles:
        p, ms = pr["plan"], pr["ms_per_sample"]
        lines.append(
            f"| {pr['setting']} | {p['micro_batch']} x {p['accumulation']}, {p['checkpointing']}"
            f", {p['quantization']} | {pr['samples_per_second']} | {pr['tokens_per_second']} | "
            f"{pr['mfu']:.1%} | {ms['data_cpu']} | {ms['vision_forward']} | "
            f"{ms['language_forward']} | {ms['backward']} | {ms['optimizer']} | "
            f"{pr['peak_allocated_gib']} |"
        )
    return "\n".join(lines)


def profile_setting(
    name: str, model_dir: Path, data_dir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """The step breakdown of one setting's plan (bench/step_profile.py), its own model load."""
    import torch

    from bench.step_profile import profile
    from trainer import data, model
    from trainer.contract.spec import RunSpec
    from trainer.plan import plan_run

    s = SETTINGS[name]
    gc.collect()
    torch.cuda.empty_cache()
    flags = ["--model-id", str(model_dir), "--dataset", f"imagefolder:{data_dir}",
             "--batch-size", str(s["batch"]), "--gradient-accumulation-steps", str(s["accum"]),
             "--max-length", "1024", *s["flags"]]  # fmt: skip
    spec = RunSpec.from_flags(flags)
    splits = data.load_splits(spec.data, 16 * args.steps, 1, 0)
    device = torch.device("cuda")
    loaded = model.load(spec, device, plan_run(spec, device, splits.labels, splits.train[0]))
    steps = 1 if name == "original" else 3
    result = profile(loaded, spec, splits.labels, splits.train, steps)
    del loaded
    gc.collect()
    torch.cuda.empty_cache()
    return {"setting": name, **result}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=["4b", "tiny"], default="4b")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps of 16 samples")
    parser.add_argument("--eval-size", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/tuneplane-bench"))
    args = parser.parse_args()

    import torch

    out = Path(os.environ.get("OUT") or args.work_dir / "out")
    out.mkdir(parents=True, exist_ok=True)
    if args.config == "4b" and not torch.cuda.is_available():
        raise SystemExit("the 4B configuration needs an NVIDIA GPU; use --config tiny on CPU")
    t0 = time.perf_counter()
    model_dir = args.work_dir / f"gemma3-{args.config}-random"
    info = build_model(model_dir, args.config)
    print(f"model: {info['parameters'] / 1e9:.2f} B parameters, built and saved in "
          f"{info['build_and_save_seconds']} s", flush=True)  # fmt: skip
    per_class_train = -(-16 * args.steps // len(PET_BREEDS))
    per_class_test = -(-args.eval_size // len(PET_BREEDS))
    data_dir = build_images(args.work_dir / "images", per_class_train, per_class_test)

    # The step profiles first: they also warm CUDA up (the first run in a process pays for
    # context set-up and kernel warm-up, which would otherwise go to whichever setting is first).
    profiles = []
    for name in ("original", "auto") if torch.cuda.is_available() else ():
        profiles.append(profile_setting(name, model_dir, data_dir, args))
        print(json.dumps(profiles[-1]), flush=True)
        (out / "profiles.json").write_text(json.dumps(profiles, indent=1))
    rows = []
    for name in SETTINGS:
        rows.append(run_setting(name, model_dir, data_dir, out, args))
        print(json.dumps(rows[-1]), flush=True)
    report = {
        "config": args.config,
        "model": info,
        "steps": args.steps,
        "eval_size": args.eval_size,
        "max_new_tokens": args.max_new_tokens,
        "torch": torch.__version__,
        "rows": rows,
        "profiles": profiles,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    rendered = table(rows, profiles)
    (out / "gpu_trainer.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_trainer.md").write_text(rendered + "\n")
    print(rendered)
    print(f"total {report['total_seconds']} s; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
