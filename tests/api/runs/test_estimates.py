"""The memory / time / cost estimate behind POST /runs' refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from api.runs import estimates
from api.runs.estimates import KNOWN, model_size
from tests.api.runs.local_estimate import estimate, refusal_detail
from trainer.contract.spec import RunSpec


def spec(**kw: Any) -> RunSpec:
    return RunSpec.model_validate({"model_id": "google/gemma-3-4b-it", "dataset": "digits", **kw})


@pytest.mark.parametrize(
    ("model_id", "params"),
    [
        ("google/gemma-3-4b-it", 4.3e9),
        ("google/gemma-3-12b-pt", 12.2e9),
        ("/models/gemma-3-27b-it", 27.4e9),
        # Known families: their configs' count, vision tower and untied head included.
        ("Qwen/Qwen2.5-VL-7B-Instruct", 8.29e9),
        ("HuggingFaceTB/SmolVLM-256M-Instruct", 228e6),
        # Gemma 4: transformers' convert_gemma4_weights.py configs, counted on the meta device.
        ("google/gemma-4-31b-it", 31.27e9),
        ("google/gemma-4-26B-A4B-it", 25.81e9),
        ("meta-llama/Llama-3.2-11B-Vision-Instruct", 11e9),
        ("org/model-1.5b", 1.5e9),
    ],
)
def test_parameter_count_from_the_model_id(model_id: str, params: float) -> None:
    count, arch = model_size(model_id)
    assert count is not None and arch is not None
    assert count == pytest.approx(params, rel=0.01)


@pytest.mark.parametrize(
    "model_id",
    ["./tiny-gemma3", "/tmp/model", "org/Qwen3-8x7b", "org/model-A3B", "org/v2.5b", "org/b"],
)
def test_ids_without_a_size_are_unknown(model_id: str) -> None:
    assert model_size(model_id) == (None, None)
    est = estimate(spec(model_id=model_id))
    assert est.fits is None and est.memory is None and est.time is None and est.cost_usd is None


def test_the_published_27b_times_are_reproduced() -> None:
    """Gemma 3 27B on one RTX PRO 6000: 1,000 / 2,500 / 3,600 samples in 1.1 / 2.3 / 3.3 h."""
    for samples, hours in [(1000, 1.1), (2500, 2.3), (3600, 3.3)]:
        est = estimate(
            spec(
                model_id="google/gemma-3-27b-it",
                gpu_type="nvidia-rtx-pro-6000",
                train_size=samples,
                time_budget_minutes=720,
                eval_mode="generate",  # the formula these figures were fitted with
            )
        )
        assert est.time is not None
        assert est.time.total_seconds / 3600 == pytest.approx(hours, rel=0.1)


def test_memory_grows_with_what_should_grow() -> None:
    def total(**kw: Any) -> float:
        est = estimate(spec(**kw))
        assert est.memory is not None
        return est.memory.total_gib

    base = total()
    assert total(batch_size=16) > base
    # Batches are padded to their longest example, not to max_length: a longer prompt grows
    # memory, a larger max_length alone does not.
    assert total(max_length=2048) == base
    assert total(dataset="oxford-iiit-pet") > base
    assert total(lora_r=256) > base
    assert total(gradient_checkpointing=False) > base
    assert total(model_id="google/gemma-3-12b-it") > base
    assert total(num_epochs=3) == base  # time, not memory


def test_bf16_weights_take_more_than_the_nf4_weights() -> None:
    def weights(**kw: Any) -> float:
        est = estimate(spec(**kw))
        assert est.memory is not None
        return est.memory.weights_gib

    nf4 = weights()
    assert weights(quantization="auto") == nf4  # the floor: bf16 only where it fits
    # The layers go from 4 to 16 bits; under NF4 the embeddings, vision tower and projector
    # are fp32 (peft casts them), under none bf16: every one of the ~4.3 B weights in 2 bytes.
    assert weights(quantization="none") > nf4
    assert weights(quantization="none") == pytest.approx(4.3e9 * 2 / 2**30, rel=0.05)


def test_which_gemma_fits_which_gpu() -> None:
    fits = {
        (name, gpu): estimate(spec(model_id=f"google/{name}-it", gpu_type=gpu)).fits
        for name in KNOWN
        if name.startswith("gemma-3")
        for gpu in ("nvidia-l4", "nvidia-rtx-pro-6000")
    }
    assert fits == {
        ("gemma-3-4b", "nvidia-l4"): True,
        # 12B at batch 8 needs about 16.5 GiB: since the loss reads logits at the answer tokens
        # only (trainer/loss.py), the ~15 GiB of full-vocabulary logits that kept it off an L4
        # are gone; its fp32 embeddings (peft's k-bit preparation) and the head's bf16 copy stay.
        ("gemma-3-12b", "nvidia-l4"): True,
        ("gemma-3-27b", "nvidia-l4"): False,
        ("gemma-3-4b", "nvidia-rtx-pro-6000"): True,
        ("gemma-3-12b", "nvidia-rtx-pro-6000"): True,
        ("gemma-3-27b", "nvidia-rtx-pro-6000"): True,
    }


def test_segments_and_cost_follow_the_time_budget() -> None:
    long = spec(model_id="google/gemma-3-27b-it", gpu_type="nvidia-rtx-pro-6000", train_size=3600)
    one = estimate(long.model_copy(update={"time_budget_minutes": 720}))
    many = estimate(long.model_copy(update={"time_budget_minutes": 55}))
    assert one.time is not None and many.time is not None
    assert one.time.segments == 1 and many.time.segments > 3
    # Every segment loads the model again: more segments cost more.
    assert many.time.total_seconds > one.time.total_seconds
    assert many.cost_usd is not None and one.cost_usd is not None
    assert many.cost_usd > one.cost_usd
    assert any("executions" in note for note in many.notes)


def test_refusal_suggests_what_would_fit() -> None:
    # 12B at batch 32 needs about 26 GiB (batch 8 fits an L4 now, test_which_gemma_fits_which_gpu).
    s = spec(model_id="google/gemma-3-12b-it", gpu_type="nvidia-l4", batch_size=32)
    detail = refusal_detail(s, estimate(s))
    assert "needs about" in detail and "22 GiB" in detail
    assert "gradient_accumulation_steps" in detail
    assert "'nvidia-rtx-pro-6000' would fit" in detail
    huge = spec(model_id="org/model-400b", gpu_type="nvidia-l4", max_length=32768)
    assert "no batch size or GPU makes it fit" in refusal_detail(huge, estimate(huge))


@pytest.mark.parametrize(
    "model_id",
    [
        "google/gemma-3-4b-it",
        "google/gemma-4-e2b-it",
        "google/gemma-4-e4b-it",
        "google/gemma-4-31b-it",
        "google/gemma-4-26b-a4b-it",
        "Qwen/Qwen2.5-VL-7B-Instruct",
        "Qwen/Qwen3-VL-8B-Instruct",
        "HuggingFaceTB/SmolVLM-256M-Instruct",
        "HuggingFaceTB/SmolVLM-500M-Instruct",
        "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
        "google/paligemma-3b-pt-224",
        "google/paligemma2-10b-pt-224",
        "llava-hf/llava-1.5-7b-hf",
        "llava-hf/llava-v1.6-mistral-7b-hf",
    ],
)
def test_every_supported_family_is_known(model_id: str) -> None:
    _, arch = model_size(model_id)
    assert arch is not None and arch.exact and arch.name != "inferred"
    assert arch.image_tokens > 0 and arch.vocab > 30_000 and arch.vision_params > 0
    est = estimate(spec(model_id=model_id, max_length=4096, gpu_type="nvidia-rtx-pro-6000"))
    assert est.memory is not None and est.cost_usd is not None


def test_an_unknown_model_is_estimated_from_its_config() -> None:
    config = {
        "model_type": "newvlm",
        "text_config": {
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
            "vocab_size": 100_000,
            "tie_word_embeddings": False,
        },
        "vision_config": {"hidden_size": 1024, "num_hidden_layers": 24, "intermediate_size": 4096},
        "mm_tokens_per_image": 144,
    }
    count, arch = model_size("/models/my-finetune", config)
    assert arch is not None and arch.name == "newvlm" and arch.image_tokens == 144
    layer = 2048 * 2048 * 2 + 2048 * 512 * 2 + 3 * 2048 * 8192
    projector = 1024 * 2048  # counted as one linear map from the tower's width to the model's
    vision = 24 * (4 * 1024 * 1024 + 2 * 1024 * 4096) + projector
    assert count == 24 * layer + 2 * 100_000 * 2048 + vision
    assert arch.projector_params == projector  # trained in full: a copy beside the original
    assert estimate(spec(model_id="/models/my-finetune"), config).fits is True
    assert model_size("/models/my-finetune", {"model_type": "x"}) == (None, None)


def test_a_max_length_that_cannot_hold_the_image_is_refused() -> None:
    est = estimate(spec(model_id="llava-hf/llava-1.5-7b-hf", max_length=512))
    assert est.fits is False and any("raise max_length to at least 640" in n for n in est.notes)
    assert "raise max_length to at least 640" in refusal_detail(spec(max_length=512), est)
    assert estimate(spec(model_id="llava-hf/llava-1.5-7b-hf", max_length=1024)).fits is True


def test_instance_memory_counts_weights_on_the_in_memory_disk() -> None:
    # Gemma 3 12B by Hub id: its cache is on the bucket mount, one file in memory at a time.
    hub = estimate(spec(model_id="google/gemma-3-12b-it", gpu_type="nvidia-l4"))
    assert hub.memory is not None and hub.memory.instance_limit_gib == 16
    assert hub.memory.instance_gib is not None and hub.memory.instance_gib < 16
    # The same weights on Cloud Run's in-memory disk (~24 GB) cannot fit an L4 instance's 16 GiB,
    # although the GPU could hold the quantized model.
    tmp = spec(
        model_id="/tmp/models/gemma-3-12b-it",
        gpu_type="nvidia-l4",
        batch_size=4,
        gradient_accumulation_steps=4,
    )
    est = estimate(tmp)
    assert est.memory is not None and est.memory.total_gib <= est.memory.gpu_gib
    assert est.memory.instance_gib is not None and est.memory.instance_gib > 16
    assert est.fits is False
    assert "in-memory disk" in refusal_detail(tmp, est)


def test_a_mixture_of_experts_trains_in_bf16_not_nf4() -> None:
    # Gemma 4 26B-A4B's experts are 3-D parameters bitsandbytes does not quantize; peft's k-bit
    # preparation makes them fp32, so NF4 needs about twice the memory of bf16 weights.
    moe = spec(model_id="google/gemma-4-26b-a4b-it", gpu_type="nvidia-rtx-pro-6000")
    nf4, bf16 = estimate(moe), estimate(moe.model_copy(update={"quantization": "none"}))
    assert nf4.memory is not None and bf16.memory is not None
    assert nf4.memory.weights_gib > 80 and nf4.fits is False
    assert bf16.memory.weights_gib < 50 and bf16.fits is True
    assert estimate(moe.model_copy(update={"quantization": "auto"})).memory == bf16.memory
    assert "quantization 'none'" in refusal_detail(moe, nf4)


def test_a_mixture_of_experts_config_counts_its_experts() -> None:
    config = {
        "model_type": "moevlm",
        "text_config": {
            "hidden_size": 1024,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "vocab_size": 50_000,
            "num_experts": 16,
            "moe_intermediate_size": 256,
            "top_k_experts": 2,
        },
    }
    _, arch = model_size("/models/moe", config)
    assert arch is not None
    assert arch.expert_params == 16 * 3 * 1024 * 256 and arch.expert_intermediate == 2 * 256
    dense = {**config, "text_config": {**config["text_config"], "enable_moe_block": False}}
    _, plain = model_size("/models/moe", dense)
    assert plain is not None and plain.expert_params == 0


def test_gemma4_global_layers_from_the_config() -> None:
    # transformers 5 writes Gemma 4's global layers as per_layer_config; older files as
    # global_head_dim and num_global_key_value_heads. Both give the same widths: 5 sliding
    # layers of 32 x 256 queries and 16 x 256 keys and values, 1 global of 32 x 512 queries and
    # 4 x 512 keys that are also the values.
    text = {
        "hidden_size": 5376,
        "num_hidden_layers": 6,
        "num_attention_heads": 32,
        "num_key_value_heads": 16,
        "head_dim": 256,
        "vocab_size": 262_144,
        "attention_k_eq_v": True,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
    }
    new = {
        "text_config": {
            **text,
            "per_layer_config": {"5": {"head_dim": 512, "num_key_value_heads": 4}},
        }
    }
    old = {"text_config": {**text, "global_head_dim": 512, "num_global_key_value_heads": 4}}
    for config in (new, old):
        _, arch = model_size("/models/g4", config)
        assert arch is not None
        assert arch.q_dim == round((5 * 32 * 256 + 32 * 512) / 6)
        assert arch.kv_dim == round((5 * 2 * 16 * 256 + 4 * 512) / 6 / 2)


def test_evaluation_follows_the_eval_mode() -> None:
    """Label scoring reads each prompt once and decodes nothing: shorter than generation, and
    max_new_tokens (generation's decoding steps) does not change it."""

    def eval_seconds(**kw: Any) -> float:
        est = estimate(spec(model_id="google/gemma-3-12b-it", **kw))
        assert est.time is not None
        return est.time.eval_seconds

    score, generate = eval_seconds(eval_mode="score"), eval_seconds(eval_mode="generate")
    assert score < generate
    assert eval_seconds(eval_mode="score", max_new_tokens=64) == score
    assert eval_seconds(eval_mode="generate", max_new_tokens=64) > generate


def test_a_segment_too_short_to_load_the_model_is_refused_not_counted_as_none() -> None:
    """27B loads in about 3 minutes (download and quantize): a 2-minute budget leaves no
    time to train, which is a refusal naming time_budget_minutes, not "0 executions"."""
    short = spec(model_id="google/gemma-3-27b-it", gpu_type="nvidia-rtx-pro-6000")
    short = short.model_copy(update={"time_budget_minutes": 2})
    est = estimate(short)
    assert est.time is not None and est.time.segments == 0 and est.fits is False
    load = est.time.load_seconds
    note = f"a segment (120 s) is shorter than loading the model ({load:g} s)"
    assert any(note in n and "time_budget_minutes to at least 5" in n for n in est.notes)
    assert note in refusal_detail(short, est)
    # At the budget the note asks for, it runs.
    fixed = estimate(short.model_copy(update={"time_budget_minutes": 5}))
    assert fixed.time is not None and fixed.time.segments > 0 and fixed.fits is True


def test_the_evaluation_figures_cited_are_the_bench_logs() -> None:
    """`_one_eval` cites the 4B's evaluation speeds: they are bench.log's own, to 2 decimals."""
    log = Path(__file__).parents[3] / "bench/results/gpu_trainer_v4/4b-8steps/bench.log"
    doc = " ".join((estimates._one_eval.__doc__ or "").split())
    rows = [json.loads(line) for line in log.read_text().splitlines() if '"timings"' in line]
    assert {r["setting"] for r in rows} == {"original", "auto", "auto-bf16"}
    for r in rows:
        pair = [r[f"{p}_eval_samples_per_second"] for p in ("baseline", "final")]
        assert f"{pair[0]:.2f} / {pair[1]:.2f}" in doc, r["setting"]


def test_importing_the_local_estimate_reads_no_environment() -> None:
    """pytest imports test helpers while collecting, before any test sets the environment up:
    a bad TUNEPLANE_ variable must fail the tests that build Settings, not the collection."""
    root = Path(__file__).parents[3]
    env = {**os.environ, "TUNEPLANE_DEFAULT_GPU_TYPE": "not-a-gpu", "PYTHONPATH": str(root)}
    code = "import tests.api.runs.local_estimate"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
