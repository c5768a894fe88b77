"""The loss mask, with the tiny model's real processor and chat template: for every example the
tokens that count decode to exactly the label and the end-of-turn marker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from trainer import data
from trainer.collator import IGNORE_INDEX, PromptTooLong, TrainCollator, eval_batch
from trainer.data import Sample
from trainer.tiny import build_tiny_model

PET_LABELS = ["Cocker Spaniel", "English Cocker Spaniel", "Great Pyrenees", "Pug"]


def _processor(path: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def _unmasked_spans(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    spans = []
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        keep = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        # One contiguous run, equal to the input there (labels are not shifted here).
        assert keep == list(range(keep[0], keep[-1] + 1))
        assert labels[keep].tolist() == ids[keep].tolist()
        spans.append(ids[keep].tolist())
    return spans


def test_only_the_answer_counts_digits(tiny_model: Path) -> None:
    processor = _processor(tiny_model)
    splits = data.load_splits("digits", 12, 1, seed=0)
    batch = TrainCollator(processor, splits.labels, max_length=512)(splits.train)
    spans = _unmasked_spans(batch)
    tokenizer = processor.tokenizer
    for sample, span in zip(splits.train, spans, strict=True):
        assert tokenizer.decode(span) == sample.label + "<end_of_turn>"
    # Image tokens are in the prompt and so never learned.
    assert (batch["labels"][batch["token_type_ids"] == 1] == IGNORE_INDEX).all()


def test_only_the_answer_counts_multi_word_labels(tmp_path: Path) -> None:
    """Labels of one to three words, of different token lengths in one batch."""
    model_dir = build_tiny_model(tmp_path / "tiny-pets", labels=PET_LABELS)
    processor = _processor(model_dir)
    image = Image.new("RGB", (40, 30), (120, 60, 30))
    samples = [Sample(f"s{i}", label, lambda: image) for i, label in enumerate(PET_LABELS * 2)]
    batch = TrainCollator(processor, PET_LABELS, max_length=512)(samples)
    for sample, span in zip(samples, _unmasked_spans(batch), strict=True):
        assert processor.tokenizer.decode(span) == sample.label + "<end_of_turn>"
    # Padded on the right, and padding is never learned.
    pad = batch["attention_mask"] == 0
    assert pad.any()
    assert batch["attention_mask"][:, 0].all()
    assert (batch["labels"][pad] == IGNORE_INDEX).all()


def test_a_prompt_longer_than_max_length_is_an_error_that_says_what_to_do(
    tiny_model: Path,
) -> None:
    processor = _processor(tiny_model)
    splits = data.load_splits("digits", 2, 1, seed=0)
    with pytest.raises(PromptTooLong, match="--max-length"):
        TrainCollator(processor, splits.labels, max_length=32)(splits.train)


def test_generation_batches_end_where_the_model_answers(tiny_model: Path) -> None:
    processor = _processor(tiny_model)
    labels = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    img = Image.new("RGB", (8, 8))
    batch = eval_batch(processor, labels, [Sample("a", "one", lambda: img)] * 3)
    assert batch["input_ids"].shape[0] == 3 and batch["attention_mask"].all()
    assert int(batch["token_type_ids"][0].sum()) == 16  # the image's soft tokens
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert text.startswith("<bos><start_of_turn>user\n")
    assert text.endswith("Answer with only the label.<end_of_turn>\n<start_of_turn>model\n")
