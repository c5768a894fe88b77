"""QLoRA through the trainer's own code on two more architectures, on an NVIDIA GPU.

    python bench/gpu_families.py gemma4    # Gemma 4 31B widths, 6 of its 60 layers
    python bench/gpu_families.py qwen2.5-vl-7b   # Qwen2.5-VL-7B, every layer
    # the spec's own settings instead of the step plan's and label scoring (the "explicit" runs
    # of bench/results/gpu_families/after-plan):
    python bench/gpu_families.py ARCH --micro-batch-size 4 --checkpointing full --eval-mode generate

Random weights (the Hub is out of reach), in the families' real classes and processors with a
word-level tokenizer holding their special tokens and chat templates
(tests/trainer/families/). Gemma 4: google/gemma-4-31b-it's config.json (text 5376 wide, 32
query heads of 256, 16 KV heads, every sixth layer global with 512-wide heads, 4 KV heads and
keys shared with values; SigLIP-like tower 1152 wide, 27 layers, 280 soft tokens per image; the
real 262,144-token vocabulary), with 6 layers (5 sliding + 1 global, the real pattern) instead
of 60, so it fits a 10-minute call; LoRA rank 64 on all linear layers as the original project
trains it. Qwen2.5-VL-7B: Qwen/Qwen2.5-VL-7B-Instruct's config.json, all 28 layers, the default
LoRA (rank 16 on the seven projections).

Each run is `trainer.cli.main` (preflight, 4-bit NF4 load through `from_pretrained`, baseline
evaluation, training, final evaluation, save) on 37 classes of 500x375 JPEGs, then the api's
estimate (api/runs/estimates.py, from the saved config.json, for the configuration that ran: the
trainer's spec with its step plan's choices, at the measured sequence length) beside the
measured peak. Writes `$OUT/gpu_families-<arch>.json` and `.md`.
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

from bench.gpu_trainer import PET_BREEDS, build_images  # noqa: E402


def gemma4_configs() -> tuple[Any, Any]:
    from transformers import Gemma4TextConfig, Gemma4VisionConfig

    rope = {
        "full_attention": {
            "partial_rotary_factor": 0.25,
            "rope_theta": 1e6,
            "rope_type": "proportional",
        },
        "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"},
    }
    text = Gemma4TextConfig(
        vocab_size=262_144,
        hidden_size=5376,
        intermediate_size=21504,
        num_hidden_layers=6,
        num_attention_heads=32,
        num_key_value_heads=16,
        head_dim=256,
        global_head_dim=512,
        num_global_key_value_heads=4,
        attention_k_eq_v=True,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        sliding_window=1024,
        final_logit_softcapping=30.0,
        use_bidirectional_attention="vision",
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=262_144,
        max_position_embeddings=262_144,
        rope_parameters=rope,
    )
    vision = Gemma4VisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=72,
        patch_size=16,
        pooling_kernel_size=3,
        standardize=True,
    )
    return text, vision


def build_gemma4(path: Path) -> Any:
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4Processor
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_gemma4 import Gemma4ImageProcessor
    from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor

    from tests.trainer.families import gemma
    from tests.trainer.families import templates as tpl
    from tests.trainer.families.tokenizers import build as build_tokenizer

    tok = build_tokenizer(
        gemma.GEMMA4_SPECIALS,
        tpl.GEMMA4_WORDS,
        labels=PET_BREEDS,
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        extra=gemma.GEMMA4_EXTRA,
        chat_template=tpl.GEMMA4_THINKING,
    )
    kw = dict(patch_size=16, max_soft_tokens=280, pooling_kernel_size=3)
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(**kw),
        tokenizer=tok,
        video_processor=Gemma4VideoProcessor(**kw),
        chat_template=tpl.GEMMA4_THINKING,
        image_seq_length=280,
    )
    text, vision = gemma4_configs()
    text.pad_token_id, text.eos_token_id, text.bos_token_id = 0, 1, 2
    config = Gemma4Config(
        text_config=text, vision_config=vision, audio_config=None, **gemma.gemma4_ids(tok)
    )
    model = _on_gpu(Gemma4ForConditionalGeneration, config)
    _randomize(model.model.embed_vision)
    return _save(path, model, processor, tok, ["<eos>", "<turn|>"])


def build_qwen(path: Path) -> Any:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from tests.trainer.families import qwen
    from tests.trainer.families import templates as tpl
    from tests.trainer.families.tokenizers import build as build_tokenizer

    tok = build_tokenizer(
        qwen.QWEN_SPECIALS,
        tpl.QWEN_WORDS,
        labels=PET_BREEDS,
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        chat_template=tpl.QWEN2_5_VL,
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=tpl.QWEN2_5_VL,
    )
    text = dict(
        vocab_size=152_064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=128_000,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    vision = dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        fullatt_block_indexes=[7, 15, 23, 31],
        window_size=112,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=False, **qwen.qwen_ids(tok)
    )
    model = _on_gpu(Qwen2_5_VLForConditionalGeneration, config)
    return _save(path, model, processor, tok, ["<|im_end|>", "<|endoftext|>"])


def _on_gpu(cls: Any, config: Any) -> Any:
    import torch

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            return cls(config)
    finally:
        torch.set_default_dtype(previous)


def _randomize(module: Any) -> None:
    from tests.trainer.families.common import randomize_zeros

    randomize_zeros(module)


def _save(path: Path, model: Any, processor: Any, tok: Any, eos: list[str]) -> dict[str, Any]:
    import torch

    from tests.trainer.families.common import save

    t0 = time.perf_counter()
    params = sum(p.numel() for p in model.parameters())
    save(path, model, processor, tok, eos)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"parameters": params, "build_and_save_seconds": round(time.perf_counter() - t0, 1)}


ARCHS = {
    # name: (builder, extra trainer flags)
    "gemma4": (build_gemma4, ["--lora-target-modules", "all-linear", "--lora-r", "64"]),
    "qwen2.5-vl-7b": (build_qwen, []),
}


def sequence_length(model_dir: Path, data_dir: Path) -> int:
    """The longest training example of a batch, as the trainer's collator builds it."""
    from transformers import AutoProcessor

    from trainer import data
    from trainer.collator import TrainCollator

    splits = data.load_splits(f"imagefolder:{data_dir}", 8, 1, seed=0)
    collate = TrainCollator(AutoProcessor.from_pretrained(model_dir), splits.labels, 4096)
    return int(collate(splits.train[:4])["attention_mask"].sum(dim=1).max())


def api_estimate(model_dir: Path, results: dict[str, Any], seq: int) -> dict[str, Any]:
    """The api's estimate for the configuration that ran: the trainer's spec with its step
    plan's choices made explicit and the measured sequence length as max_length (as
    tests/api/runs/test_memory_measured.py does)."""
    from api.runs.estimates import estimate
    from trainer.contract.spec import RunSpec

    config = json.loads((model_dir / "config.json").read_text())
    plan = results["step_plan"]
    spec = RunSpec.model_validate({
        **results["spec"],
        "micro_batch_size": plan["micro_batch"],
        "checkpointing": plan["checkpointing"],
        "quantization": plan["quantization"],
        "max_length": seq,
    })  # fmt: skip
    # Only the memory is read: the segment length changes the time alone.
    est = estimate(spec, timedelta(minutes=spec.time_budget_minutes), config)
    assert est.memory is not None
    return {"architecture": est.architecture, "parameters": est.parameters,
            **est.memory.model_dump()}  # fmt: skip


def run(arch: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch

    from trainer.cli import main as trainer_main

    build, extra = ARCHS[arch]
    work = args.work_dir
    model_dir = work / arch
    t0 = time.perf_counter()
    info = build(model_dir)
    print(f"{arch}: {info['parameters'] / 1e9:.2f} B parameters, built and saved in "
          f"{info['build_and_save_seconds']} s", flush=True)  # fmt: skip
    data_dir = build_images(work / "images", -(-8 * args.steps // 37), 1)
    seq = sequence_length(model_dir, data_dir)
    output_dir = work / f"run-{arch}"
    shutil.rmtree(output_dir, ignore_errors=True)
    # The step plan's and evaluation's choices, when given: the spec's own settings instead of
    # the trainer's defaults (auto plan, label scoring).
    chosen = [(f"--{name}", value) for name, value in (
        ("micro-batch-size", args.micro_batch_size), ("checkpointing", args.checkpointing),
        ("eval-mode", args.eval_mode)) if value is not None]  # fmt: skip
    argv = ["--model-id", str(model_dir), "--dataset", f"imagefolder:{data_dir}",
            "--train-size", str(2 * args.batch * args.steps), "--eval-size", str(args.eval_size),
            "--batch-size", str(args.batch), "--gradient-accumulation-steps", "2",
            "--eval-batch-size", str(args.batch), "--max-new-tokens", "4",
            "--max-length", "1024", "--save-steps", "1000000", "--output-dir", str(output_dir),
            "--device", "cuda", *extra, *[x for pair in chosen for x in pair]]  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    code = trainer_main(argv)
    results = json.loads((output_dir / "results.json").read_text())
    shutil.copyfile(output_dir / "results.json", out / f"results-{arch}.json")
    if code != 0:
        raise SystemExit(f"{arch}: the trainer failed: {results.get('error')}")
    gib = 2**30
    lora = {"lora_target_modules": ["all-linear"], "lora_r": 64} if extra else {}
    estimated = api_estimate(model_dir, results, seq)
    plan = results["step_plan"]
    reserved = torch.cuda.max_memory_reserved() / gib
    return {
        "arch": arch,
        "model": info,
        "sequence_length": seq,
        "batch_size": args.batch,
        "gradient_accumulation_steps": 2,
        "plan": f"{plan['micro_batch']} x {plan['accumulation']}, {plan['checkpointing']}",
        "eval_mode": results["eval_mode"],
        "lora": lora or "default",
        "train_samples_per_second": results["throughput"]["train_samples_per_second"],
        "final_eval_samples_per_second": results["final"]["samples_per_second"],
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 2),
        "peak_reserved_gib": round(reserved, 2),
        "estimate": estimated,
        # Against the peak PyTorch allocated (results.json's peak_gpu_memory_gb): what a card
        # must hold. The reserve on a 141 GB H200 is larger because nothing makes the caching
        # allocator give memory back; on a card that fills up it frees cached blocks first.
        "estimate_error": round(
            estimated["total_gib"] / (torch.cuda.max_memory_allocated() / gib) - 1, 3
        ),
        "timings": results["timings"],
        "trainable_params": results["model"]["trainable_params"],
        "steps": results["training"]["step"],
        "gpu": results["environment"]["gpu_name"],
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }


def table(r: dict[str, Any]) -> str:
    est = r["estimate"]
    return "\n".join([
        "| arch | params | seq | plan (micro x accum, checkpointing) | eval | train samples/s | "
        "eval samples/s | peak allocated GiB | peak reserved GiB | api estimate GiB | estimate "
        "vs allocated |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['arch']} | {r['model']['parameters'] / 1e9:.2f} B | {r['sequence_length']} | "
        f"{r.get('plan', str(r['batch_size']) + ' x 2')} | {r.get('eval_mode', '')} | "
        f"{r['train_samples_per_second']:.2f} | "
        f"{r['final_eval_samples_per_second']:.2f} | {r['peak_allocated_gib']:.1f} | "
        f"{r['peak_reserved_gib']:.1f} | {est['total_gib']:.1f} | {r['estimate_error']:+.1%} |",
    ])  # fmt: skip


def rerender(paths: list[Path]) -> None:
    """Rewrite the tables from saved reports (`--rerender gpu_families-*.json`)."""
    for path in paths:
        report = json.loads(path.read_text())
        est, peak = report["estimate"]["total_gib"], report["peak_allocated_gib"]
        report["estimate_error"] = round(est / peak - 1, 3)
        path.write_text(json.dumps(report, indent=1))
        path.with_suffix(".md").write_text(table(report) + "\n")


def main() -> int:
    if sys.argv[1:2] == ["--rerender"]:
        rerender([Path(p) for p in sys.argv[2:]])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arch", choices=sorted(ARCHS))
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--eval-size", type=int, default=16)
    # The trainer's own flags, passed through when given (else its defaults: auto, score).
    parser.add_argument("--micro-batch-size", help="e.g. 4 (default: the step plan's choice)")
    parser.add_argument("--checkpointing", choices=["none", "selective", "full"])
    parser.add_argument("--eval-mode", choices=["score", "generate"])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/tuneplane-families"))
    args = parser.parse_args()
    out = Path(os.environ.get("OUT") or args.work_dir / "out")
    out.mkdir(parents=True, exist_ok=True)
    report = run(args.arch, args, out)
    rendered = table(report)
    (out / f"gpu_families-{args.arch}.json").write_text(json.dumps(report, indent=1))
    (out / f"gpu_families-{args.arch}.md").write_text(rendered + "\n")
    print(rendered, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
