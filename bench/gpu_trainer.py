"""Speed and memory of the trainer on Gemma 3 architectures (4B; 12B with --with-12b): the
original settings, the step plan (NF4 and `quantization: auto`), where a step's time goes, and
the article's 27B pet workload projected to other cards.

    pip install -e '.[trainer]'                # where the trainer's packages are missing
    python bench/gpu_trainer.py --with-12b     # NVIDIA GPU (H200: ~7 min; --quick ~5), $OUT
    python bench/gpu_trainer.py --config tiny  # the same flow on CPU, in a few minutes

Builds a `Gemma3ForConditionalGeneration` per architecture (bench/architectures.py; random
weights: the Hub is out of reach), saves it locally in bf16 with a small word-level tokenizer and
a Gemma3Processor at 896 pixels, and writes an image-folder data set of 37 classes (named like the
pet breeds, so the prompt has the real length) of 500x375 JPEGs. Then, in this one process, per
architecture:

- the step breakdown (bench/step_profile.py) of the original settings (4B only), the auto plan
  with NF4 and with `quantization: auto`: per-sample milliseconds of data, vision forward,
  language forward, backward and optimizer, samples/s, tokens/s, MFU, peak memory beside the
  planner's estimate (tests/trainer/test_plan_calibration.py checks committed profiles);
- the trainer itself (`trainer.cli.main`: load -> baseline eval -> training -> final eval ->
  save) in three settings over the pet workload's 3 epochs (`--epochs`; the same for every row
  but 12B's original one, 1 epoch): "original" (the original script's: batch 1 x accumulation
  16, full gradient checkpointing, free generation one sample at a time), "auto" (the same 16
  samples per optimizer step split by the step plan, NF4, label scoring in batches of 32) and
  "auto-bf16" (the same with `--quantization auto`).

It prints every run (samples/s for training and both evaluations, peak GPU memory allocated
and reserved, the step plan, the api's admission estimate for the real Hub model), the step
profiles, the 27B projection (bench/projection.py) and last a short summary with ratios and
issue 16's targets. Everything goes to `$OUT` when set (else WORK_DIR/out): `gpu_trainer.json`,
`gpu_trainer.md`, `profiles.json` and each run's results.json. Random weights mean accuracy is
meaningless here; speed and memory are not.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from datetime import timedelta
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


def build_model(path: Path, config_name: str) -> dict[str, Any]:
    """Write a random-weight Gemma 3 checkpoint in bf16 with a tokenizer and processor."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    from bench import architectures
    from trainer import tiny

    if (path / "bench-model.json").exists():
        return json.loads((path / "bench-model.json").read_text())
    text, vision, tokens_per_image, image_size = architectures.PARTS[config_name]()
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

    # The marker holds the counts: a set built by an earlier, smaller call is built again
    # (once it was silently reused, and a 128-sample run trained on 74).
    counts = f"{per_class_train} {per_class_test}"
    done = root / "done"
    if done.exists() and done.read_text() == counts:
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        for label in PET_BREEDS:
            folder = root / split / label.replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=85)
    done.write_text(counts)
    return root


SETTINGS: dict[str, dict[str, Any]] = {
    # The original script: batch 1, accumulation 16, checkpointing, one sample per generate().
    "original": {
        "batch": 1, "accum": 16, "eval_batch": 1, "steps": 1, "eval_size": 8,
        "flags": ["--micro-batch-size", "1", "--checkpointing", "full", "--eval-mode", "generate",
                  "--kernels", "plain"],
    },
    # The same 16 samples per optimizer step, split by the step plan; label scoring.
    "auto": {"batch": 8, "accum": 2, "eval_batch": 32, "flags": []},
    "auto-bf16": {"batch": 8, "accum": 2, "eval_batch": 32, "flags": ["--quantization", "auto"]},
}  # fmt: skip
HUB_IDS = {"4b": "google/gemma-3-4b-it", "12b": "google/gemma-3-12b-it"}


def estimated_gib(config: str, results: dict[str, Any]) -> float | None:
    """What the api's admission check (api/runs/estimates.py) predicts for the real Hub model
    with the spec and plan that ran (its micro-batch, checkpointing, weights and evaluation
    mode): the figure this bench exists to check. The api guesses the prompt's length from
    the data set (496 tokens here; the examples have ~465); tests/api/runs/test_memory_measured.py
    compares at the measured length."""
    plan = results.get("step_plan")
    if config not in HUB_IDS or not plan:
        return None
    from api.runs.estimates import estimate
    from trainer.contract.spec import RunSpec

    spec = RunSpec.model_validate({
        **results["spec"],
        "model_id": HUB_IDS[config],
        "micro_batch_size": plan["micro_batch"],
        "checkpointing": plan["checkpointing"],
        "quantization": plan["quantization"],
    })  # fmt: skip
    # Only the memory is read: the segment length changes the time alone.
    memory = estimate(spec, timedelta(minutes=spec.time_budget_minutes)).memory
    return None if memory is None else memory.total_gib


def run_setting(name: str, suite: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One whole trainer run (`trainer.cli.main`) of setting `name` in this process."""
    import torch

    from trainer.cli import main as trainer_main

    s, config = SETTINGS[name], suite["config"]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # The run's own output (adapter, checkpoints: hundreds of MB for 4B) stays in the work
    # directory, fresh each time so that nothing is resumed; only results.json goes to `out`.
    output_dir = args.work_dir / f"run-{config}-{name}"
    shutil.rmtree(output_dir, ignore_errors=True)
    epochs = suite["original_epochs"] if name == "original" else suite["epochs"]
    argv = [
        "--model-id", str(suite["model_dir"]),
        "--dataset", f"imagefolder:{suite['data_dir']}",
        "--train-size", str(16 * s.get("steps", suite["steps"])),
        "--eval-size", str(s.get("eval_size", suite["eval_size"])),
        "--num-epochs", str(epochs),
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
    shutil.copyfile(output_dir / "results.json", suite["out"] / f"results-{config}-{name}.json")
    if code != 0:
        raise SystemExit(f"{config} {name}: the trainer failed: {results.get('error')}")
    tp = results["throughput"]
    gib = 2**30
    cuda = torch.cuda.is_available()
    return {
        "config": config,
        "setting": name,
        "epochs": epochs,
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 2) if cuda else None,
        "estimated_gib": estimated_gib(config, results),
        "baseline_eval_samples_per_second": results["baseline"]["samples_per_second"],
        "final_eval_samples_per_second": results["final"]["samples_per_second"],
        "eval_tflop_per_sample": suite["eval_tflop"],
        "batch_size": s["batch"],
        "gradient_accumulation_steps": s["accum"],
        "eval_batch_size": s["eval_batch"],
        "train_samples_per_second": tp["train_samples_per_second"],
        "step_plan": results.get("step_plan"),
        "eval_mode": results.get("eval_mode"),
        "weights": results["model"].get("weights"),
        "peak_gpu_memory_gb": results["peak_gpu_memory_gb"],
        "timings": results["timings"],
        "steps": results["training"]["step"],
        "wall_seconds": round(wall, 1),
        "gpu": results["environment"]["gpu_name"],
    }


def profile_setting(name: str, suite: dict[str, Any]) -> dict[str, Any]:
    """The step breakdown of one setting's plan (bench/step_profile.py), its own model load:
    one warm-up step, then `suite["profile_steps"]` timed ones (original: 1)."""
    import torch

    from bench.step_profile import profile
    from trainer import data, model
    from trainer.contract.spec import RunSpec
    from trainer.plan import plan_run

    s = SETTINGS[name]
    gc.collect()
    torch.cuda.empty_cache()
    flags = ["--model-id", str(suite["model_dir"]),
             "--dataset", f"imagefolder:{suite['data_dir']}",
             "--batch-size", str(s["batch"]), "--gradient-accumulation-steps", str(s["accum"]),
             "--max-length", "1024", *s["flags"]]  # fmt: skip
    spec = RunSpec.from_flags(flags)
    steps = 1 if name == "original" else suite["profile_steps"]
    splits = data.load_splits(spec.data, 16 * (steps + 1), 1, 0)
    device = torch.device("cuda")
    loaded = model.load(spec, device, plan_run(spec, device, splits.labels, splits.train[0]))
    result = profile(loaded, spec, splits.labels, splits.train, steps)
    del loaded
    gc.collect()
    torch.cuda.empty_cache()
    return {"config": suite["config"], "setting": name, **result}


def run_suite(config: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Every setting on architecture `config`: step profiles first (they also warm CUDA up:
    the first run in a process pays for context set-up and kernel warm-up), then the runs."""
    import torch

    from bench.projection import flops

    big = config == "12b"
    steps = args.steps_12b if big else args.steps
    eval_size = args.eval_size_12b if big else args.eval_size
    model_dir = args.work_dir / f"gemma3-{config}-random"
    info = build_model(model_dir, config)
    print(f"{config}: {info['parameters'] / 1e9:.2f} B parameters, built and saved in "
          f"{info['build_and_save_seconds']} s", flush=True)  # fmt: skip
    per_class_train = -(-16 * max(steps, 4) // len(PET_BREEDS))
    per_class_test = -(-max(eval_size, 128) // len(PET_BREEDS))
    suite = {
        "config": config,
        "model_dir": model_dir,
        "data_dir": build_images(args.work_dir / "images", per_class_train, per_class_test),
        "out": out,
        "steps": steps,
        "eval_size": eval_size,
        "epochs": args.epochs,
        # The original settings run ~1 sample/s on 4B and ~3x slower on 12B: one epoch there.
        "original_epochs": 1 if big else args.epochs,
        "profile_steps": 1 if big else 2,
        "eval_tflop": None,
    }
    profiles = []
    names = ("auto", "auto-bf16") if big else ("original", "auto", "auto-bf16")
    for name in names if torch.cuda.is_available() else ():
        profiles.append(profile_setting(name, suite))
        print(json.dumps(profiles[-1]), flush=True)
    if profiles:
        f = flops(config, profiles[-1]["tokens_per_example"])
        suite["eval_tflop"] = round((f["vision_forward"] + f["language_forward"]) / 1e12, 3)
    rows = []
    for name in SETTINGS:
        rows.append(run_setting(name, suite, args))
        print(json.dumps(rows[-1]), flush=True)
    return {"config": config, "model": info, "steps": steps, "eval_size": eval_size,
            "epochs": args.epochs, "rows": rows, "profiles": profiles}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=["4b", "12b", "tiny"], default="4b")
    parser.add_argument("--with-12b", action="store_true", help="then the same on 12B")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (of 16) an epoch")
    parser.add_argument("--epochs", type=int, default=3, help="the pet workload's 3")
    parser.add_argument("--eval-size", type=int, default=128)
    parser.add_argument("--steps-12b", type=int, default=2)
    parser.add_argument("--eval-size-12b", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="2 (12B: 1) steps an epoch, "
                        "96 (12B: 64) evaluations, for a short device lease")  # fmt: skip
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/tuneplane-bench"))
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_size, args.steps_12b, args.eval_size_12b = 2, 96, 1, 64

    import torch

    from bench.gpu_tables import summary, table
    from bench.projection import project

    out = Path(os.environ.get("OUT") or args.work_dir / "out")
    out.mkdir(parents=True, exist_ok=True)
    if args.config != "tiny" and not torch.cuda.is_available():
        raise SystemExit("the 4B and 12B configurations need an NVIDIA GPU; --config tiny on CPU")
    t0 = time.perf_counter()
    configs = [args.config] + (["12b"] if args.with_12b and args.config != "12b" else [])
    suites = []
    for config in configs:
        suites.append(run_suite(config, args, out))
        # Written after each architecture: a lease that ends during the next keeps these.
        (out / "gpu_trainer.json").write_text(json.dumps({"suites": suites}, indent=1))
        profiles = [p for s in suites for p in s["profiles"]]
        (out / "profiles.json").write_text(json.dumps(profiles, indent=1))
    rows = [r for s in suites for r in s["rows"]]
    tokens = profiles[-1]["tokens_per_example"] if profiles else 466
    rendered = "\n\n".join([table(rows, profiles), project(profiles, rows, tokens)])
    report = {"suites": suites, "torch": torch.__version__,
              "total_seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    (out / "gpu_trainer.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_trainer.md").write_text(rendered + "\n\n" + summary(rows) + "\n")
    print(rendered)
    print(f"total {report['total_seconds']} s; written to {out}")
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
