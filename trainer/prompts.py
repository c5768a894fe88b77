"""Chat formatting: one user turn (the image and an instruction listing the labels), one model
turn (the label). Always through the processor's own chat template, so the trainer formats
exactly as the model was instruction-tuned, whatever the model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def instruction(labels: Sequence[str]) -> str:
    return (
        "What is in this image? Answer with exactly one of these labels: "
        + ", ".join(labels)
        + ". Answer with only the label."
    )


def messages(labels: Sequence[str], answer: str | None = None) -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": instruction(labels)}],
        }
    ]
    if answer is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return turns


def prompt_text(processor: Any, labels: Sequence[str]) -> str:
    """The templated user turn up to where the model starts answering."""
    text: str = processor.apply_chat_template(
        messages(labels), tokenize=False, add_generation_prompt=True
    )
    return text


def training_text(processor: Any, labels: Sequence[str], answer: str) -> tuple[str, str]:
    """(prompt, prompt + answer turn) for one training example.

    The answer turn is cut after the template's end-of-turn marker: whatever the template puts
    after it (Gemma: a newline) is the start of the next turn, which the model should not learn
    to produce. Raises when the template does not extend the generation prompt, because then
    there is no position at which the answer starts.
    """
    prompt = prompt_text(processor, labels)
    full: str = processor.apply_chat_template(messages(labels, answer), tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(
            "the chat template's answer turn does not start with its generation prompt; "
            "cannot tell where the answer begins"
        )
    return prompt, prompt + full[len(prompt) :].rstrip()
