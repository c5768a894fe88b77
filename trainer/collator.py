"""Batches for training (loss on the answer only) and for generation (prompts, left padded).

The loss mask comes from positions: an example's prompt (everything up to where the model starts
answering, image tokens included) is tokenized on its own, and only the tokens after it count.
Searching the tokenized text for the label's tokens instead breaks whenever a label tokenizes
differently in context than alone (common with BPE: "Beagle" vs " Beagle").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from trainer import prompts
from trainer.data import Sample
from trainer.prompts import Format

IGNORE_INDEX = -100


class PromptTooLong(ValueError):
    pass


class TrainCollator:
    def __init__(self, processor: Any, labels: Sequence[str], max_length: int) -> None:
        self.processor = processor
        self.labels = list(labels)
        self.max_length = max_length
        self.format: Format = prompts.prompt_format(processor, self.labels)
        # Prompt token ids per image size: the number of image tokens can depend on the size
        # (it does not for Gemma 3, it does for Qwen2-VL), the rest of the prompt never changes.
        self._prompt_ids: dict[tuple[int, int], list[int]] = {}

    def __call__(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        images = [[s.image()] for s in samples]
        fmt = self.format
        if fmt.prefix_lm:
            # The processor writes prefix and suffix itself and returns `labels` (the suffix
            # and its EOS) and `token_type_ids` (0: prefix, attended both ways; 1: suffix, causal).
            batch = self.processor(
                text=[fmt.prompt] * len(samples),
                images=images,
                suffix=[s.label for s in samples],
                padding=True,
                padding_side="right",
                return_tensors="pt",
            )
            batch["labels"] = torch.as_tensor(batch["labels"])
            batch["labels"][batch["attention_mask"] == 0] = IGNORE_INDEX
            self._check_lengths(batch["attention_mask"])
            return dict(batch)
        batch = self.processor(
            text=[fmt.prompt + fmt.answer_text(s.label) for s in samples],
            images=images,
            padding=True,
            padding_side="right",
            return_tensors="pt",
        )
        input_ids = batch["input_ids"]
        lengths = self._check_lengths(batch["attention_mask"])
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for i, (img, length) in enumerate(zip(images, lengths, strict=True)):
            start = _common_prefix(self._prompt_for(img[0]), input_ids[i, :length].tolist())
            labels[i, start:length] = input_ids[i, start:length]
        batch["labels"] = labels
        return dict(batch)

    def _check_lengths(self, attention: torch.Tensor) -> list[int]:
        lengths = [int(row.sum()) for row in attention]
        if max(lengths) > self.max_length:
            raise PromptTooLong(
                f"a training example takes {max(lengths)} tokens, more than max_length "
                f"{self.max_length}; raise --max-length (the prompt lists every label and "
                "the image takes its own tokens)"
            )
        return lengths

    def _prompt_for(self, image: Any) -> list[int]:
        key = image.size
        if key not in self._prompt_ids:
            enc = self.processor(text=[self.format.prompt], images=[[image]], return_tensors="pt")
            self._prompt_ids[key] = enc["input_ids"][0].tolist()
        return self._prompt_ids[key]


def _common_prefix(prompt_ids: list[int], ids: list[int]) -> int:
    """Where the answer starts: the end of the prompt's tokens, or earlier if the tokenizer
    merged the prompt's last token with the answer's first (then that token is learned too)."""
    n = 0
    for a, b in zip(prompt_ids, ids, strict=False):
        if a != b:
            break
        n += 1
    return n


def eval_batch(processor: Any, labels: Sequence[str], samples: Sequence[Sample]) -> Any:
    """Prompts for generation, padded on the left so every row's answer starts at the same
    position (the new tokens are then simply `output[:, input_len:]`)."""
    prompt = prompts.prompt_text(processor, labels)
    return processor(
        text=[prompt] * len(samples),
        images=[[s.image()] for s in samples],
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
