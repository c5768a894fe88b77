"""Label scoring against a brute-force reference: one full forward per (sample, label) over the
prompt and that label's answer, its answer tokens' log-probabilities summed. The scorer's
prompt forward + one label-tree forward must give the same numbers (fp32 on the CPU: within
2e-5) and so the same predicted labels; tests/trainer/families/test_scoring_families.py does the
same for every family."""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from trainer import data
from trainer.collator import IGNORE_INDEX, TrainCollator
from trainer.data import Sample
from trainer.scoring import Memo, evaluate_by_scoring, score_labels
from trainer.tiny import build_tiny_model

PET_LABELS = ["Cocker Spaniel", "English Cocker Spaniel", "Great Pyrenees", "Pug"]
TOLERANCE = 2e-5  # fp32, same kernels; differences are summation order only (~1e-6)


def _load(path: Path, **kwargs: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, **kwargs)
    return model.eval(), AutoProcessor.from_pretrained(path)


def brute_force(
    model: Any, processor: Any, labels: Sequence[str], samples: Sequence[Sample]
) -> torch.Tensor:
    coll = TrainCollator(processor, labels, 512)
    out = torch.zeros(len(samples), len(labels))
    for i, s in enumerate(samples):
        for j, label in enumerate(labels):
            batch = coll([Sample(s.sample_id, label, s.load)])
            target = batch.pop("labels")[0]
            with torch.no_grad():
                logits = model(**batch).logits[0].float()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            nxt = target[1:]
            keep = nxt != IGNORE_INDEX
            out[i, j] = logp[keep].gather(-1, nxt[keep, None]).sum()
    return out


def _randomise(model: Any) -> None:
    """The tiny checkpoint's projector starts at zero (as Gemma 3's does); random weights make
    the image matter, so a wrong prefix would show."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)


def test_scores_equal_a_full_forward_per_label_digits(tiny_model: Path) -> None:
    model, processor = _load(tiny_model)
    _randomise(model)
    splits = data.load_splits("digits", 1, 5, seed=0)
    scores = check_against_brute_force(model, processor, splits.labels, splits.eval, batch_size=2)
    assert scores.shape == (5, len(splits.labels))


def test_scores_equal_a_full_forward_with_multi_token_labels(tmp_path: Path) -> None:
    """Labels of 1 to 3 words (so answers of different lengths, padded), one a suffix of another."""
    path = build_tiny_model(tmp_path / "pets", labels=PET_LABELS)
    model, processor = _load(path)
    _randomise(model)
    scores = check_against_brute_force(model, processor, PET_LABELS, _pet_samples())
    assert (scores[0] - scores[1]).abs().max() > 1e-3  # the image reaches the scores


def _pet_samples() -> list[Sample]:
    colours = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]
    return [
        Sample(f"s{i}", PET_LABELS[i], lambda c=c: Image.new("RGB", (40, 30), c))
        for i, c in enumerate(colours)
    ]


def check_against_brute_force(
    model: Any,
    processor: Any,
    labels: Sequence[str],
    samples: Sequence[Sample],
    *,
    max_length: int = 512,
    batch_size: int | None = None,
) -> torch.Tensor:
    """The scorer's (samples, labels) scores, checked against `brute_force`: within TOLERANCE,
    and the same predicted labels."""
    scores = score_labels(
        model,
        processor,
        labels,
        samples,
        max_length=max_length,
        device=torch.device("cpu"),
        batch_size=batch_size or len(samples),
    )
    reference = brute_force(model, processor, labels, samples)
    assert torch.allclose(scores, reference, atol=TOLERANCE, rtol=0), (
        (scores - reference).abs().max()
    )
    assert scores.argmax(-1).tolist() == reference.argmax(-1).tolist()
    return scores


def test_a_sliding_window_shorter_than_the_prompt(tmp_path: Path) -> None:
    """Gemma 3's sliding layers with a window of 6 tokens (the prompt is ~60): their cache keeps
    5 prompt keys and an answer token at depth d must not see the oldest d of them."""
    from transformers import AutoConfig

    path = build_tiny_model(tmp_path / "pets", labels=PET_LABELS)
    config = AutoConfig.from_pretrained(path)
    config.text_config.sliding_window = 6
    model, processor = _load(path, config=config)
    _randomise(model)
    assert "sliding_attention" in config.text_config.layer_types
    check_against_brute_force(model, processor, PET_LABELS, _pet_samples())


def test_eager_attention_takes_the_additive_mask(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path / "pets", labels=PET_LABELS)
    model, processor = _load(path, attn_implementation="eager")
    _randomise(model)
    check_against_brute_force(model, processor, PET_LABELS, _pet_samples())


@pytest.mark.slow
def test_a_trained_model_scores_at_least_as_well_as_it_generates(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Train the tiny model (generation for its evaluations, results.json says so), then score
    the same evaluation split with the saved adapter: every scored answer is a label, and the
    accuracy is at least generation's (which can also answer no label at all)."""
    from peft import PeftModel

    from trainer.cli import main

    flags = shlex.split(
        "--dataset digits --train-size 1400 --eval-size 100 --num-epochs 2 --learning-rate 3e-3"
        " --batch-size 16 --gradient-accumulation-steps 1 --eval-batch-size 50"
        " --max-new-tokens 4 --save-steps 1000 --seed 1 --eval-mode generate"
    )
    assert main(["--model-id", str(tiny_model), *flags, "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["eval_mode"] == "generate"
    generated = results["final"]["accuracy"]

    base, processor = _load(tiny_model)
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    splits = data.load_splits("digits", 1400, 100, seed=1)
    metrics = evaluate_by_scoring(
        model,
        processor,
        splits.labels,
        splits.eval,
        max_length=512,
        device=torch.device("cpu"),
        batch_size=50,
    )
    print(f"\ndigits: generated {generated:.2f}, scored {metrics.accuracy:.2f}")
    assert metrics.unknown_rate == 0
    assert generated > 3 * 0.1  # it learned something, so the comparison means something
    assert metrics.accuracy >= generated


def test_a_second_pass_reads_the_vision_features_and_scores_the_same(tiny_model: Path) -> None:
    """The final evaluation reads the baseline's image features (frozen tower) and label
    continuations: the same scores, every image a cache hit, one prompt's continuations, and
    not one image decoded (Memo: the batches are made from the first pass's text)."""
    from trainer.features import FeatureCache

    model, processor = _load(tiny_model)
    _randomise(model)
    splits = data.load_splits("digits", 1, 5, seed=0)
    decoded: list[str] = []

    def counted(sample: Sample) -> Sample:
        def load() -> Any:
            decoded.append(sample.sample_id)
            return sample.load()

        return Sample(sample.sample_id, sample.label, load)

    samples = [counted(s) for s in splits.eval]
    model.requires_grad_(False)  # frozen, as the trainer leaves the tower
    cache = FeatureCache.for_model(model)
    assert cache is not None
    memo = Memo()
    kwargs: dict[str, Any] = dict(
        max_length=512, device=torch.device("cpu"), batch_size=2, features=cache, memo=memo
    )
    first = score_labels(model, processor, splits.labels, samples, **kwargs)
    assert (cache.hits, cache.misses) == (0, 5)
    assert set(decoded) == {s.sample_id for s in samples}
    decoded.clear()
    second = score_labels(model, processor, splits.labels, samples, **kwargs)
    assert (cache.hits, cache.misses) == (5, 5)
    assert torch.equal(first, second)
    assert decoded == []
    assert len(memo.continuations) == 1  # digits: one image size, one prompt
    # Without the cache, nothing is taken for granted: every image is decoded again.
    third = score_labels(model, processor, splits.labels, samples, **{**kwargs, "features": None})
    assert torch.allclose(first, third, atol=1e-5) and len(decoded) >= len(samples)


def test_the_memo_keeps_one_prompt_text_and_gives_up_on_any_other() -> None:
    """Memo reuses the prompt text only while every chunk was the same uniform batch: a chunk
    of two prompts, another prompt, or a key beside text and pixels (an image grid) ends it."""
    from trainer.features import FeatureCache

    def batch(ids: list[int], rows: int = 2, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
        input_ids = torch.tensor([ids] * rows)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.zeros(rows, 3, 4, 4),
            **extra,
        }

    tower = torch.nn.Linear(4, 4).requires_grad_(False)  # a frozen "tower" over 4x4 pixels
    cache = FeatureCache(tower)
    with cache.keys(["a", "b"]):
        tower(torch.zeros(2, 3, 4, 4))  # both images encoded once, as by a first pass

    memo = Memo()
    memo.remember([([0, 1], batch([5, 6, 7]))], 2)
    memo.remember([([0, 1], batch([5, 6, 7]))], 2)
    made = memo.batch_without_images(["a", "b"], cache)
    assert made is not None and made["input_ids"].tolist() == [[5, 6, 7]] * 2
    assert made["pixel_values"].shape == (2, 3, 1, 1)
    assert memo.batch_without_images(["a", "c"], cache) is None  # "c" is not cached

    for other in (
        [([0, 1], batch([5, 6, 8]))],  # another prompt
        [([0], batch([5, 6, 7], rows=1)), ([1], batch([5, 6], rows=1))],  # two groups
        [([0, 1], batch([5, 6, 7], image_grid_thw=torch.ones(2, 2)))],  # a grid beside
    ):
        memo = Memo()
        memo.remember([([0, 1], batch([5, 6, 7]))], 2)
        memo.remember(other, 2)
        assert memo.mixed and memo.batch_without_images(["a", "b"], cache) is None
