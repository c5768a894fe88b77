"""Where an answer starts and what ends it, read from a chat template's own renderings.

Shared by the trainer (which renders through the processor) and the api's create-run check
(which renders the template files with jinja2, without torch): both pass the rendered strings
here, so the rule is written once. Pure string work, no imports beyond the standard library:
the api ships this package without torch, and jinja2 stays on the caller's side (the trainer
never needs it directly, and the contract should not grow a template engine).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Thinking channels a generated answer may hold before the label: (open, close) markers.
# Gemma 4's `<|channel>thought\n...<channel|>`, Qwen3 / DeepSeek style `<think>...</think>`.
THINKING_CHANNELS = (("<|channel>", "<channel|>"), ("<think>", "</think>"))


def instruction(labels: Sequence[str]) -> str:
    return (
        "What is in this image? Answer with exactly one of these labels: "
        + ", ".join(labels)
        + ". Answer with only the label."
    )


def messages(labels: Sequence[str], answer: str | None = None) -> list[dict[str, Any]]:
    """The conversation the trainer renders: one user turn (an image, the instruction) and,
    for training, one assistant turn (the label)."""
    turns: list[dict[str, Any]] = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": instruction(labels)}],
        }
    ]
    if answer is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return turns


class ChatFormatError(ValueError):
    """The template gives no position at which an answer starts."""


@dataclass(frozen=True)
class AnswerFormat:
    prompt: str  # the generation prompt: everything before the answer
    lead: str  # whitespace the template writes between the prompt and the answer (" " for SmolVLM)
    end: str  # what the model must emit after the answer to stop (an end-of-turn marker or EOS)


def answer_format(
    prompt: str, full: str, answer: str, specials: Sequence[str], eos: str | None
) -> AnswerFormat:
    """From the generation prompt and the rendering of the same conversation with `answer` as
    the assistant's turn, the answer's end marker.

    Templates whose history differs from their generation prompt are handled: Gemma 4's 31B-it
    template ends the generation prompt in an empty thought channel
    (`<|channel>thought\\n<channel|>`, thinking off) but strips channels from past model turns,
    so the rendered answer turn does not extend the prompt. Training then uses the generation
    prompt itself followed by the answer: exactly what the model sees when it is asked to
    answer with thinking off, so it learns to answer after an empty channel (what "thinking
    off" means), never to skip a channel it was asked to open (`enable_thinking` stays off in
    training and evaluation alike).

    The end marker is what the template writes after the answer, up to and including its first
    special token (`<end_of_turn>`, `<|im_end|>`, `<turn|>`, `<end_of_utterance>`); a template
    that writes no special token there (LLaVA-1.5's trailing space, LLaVA-NeXT's literal `<\\s>`
    text) ends with the tokenizer's EOS, which is what its model emits to stop.
    """
    if full.startswith(prompt):
        rest = full[len(prompt) :]
    else:
        common = _common_prefix(prompt, full)
        at = full.find(answer, common)
        if at < 0:
            raise ChatFormatError(
                "the chat template's answer turn does not contain the answer after the part it "
                "shares with the generation prompt; cannot tell where the answer begins"
            )
        rest = full[at:]
    stripped = rest.lstrip()
    if not stripped.startswith(answer):
        raise ChatFormatError(
            "the chat template does not put the answer right after its generation prompt "
            f"(it writes {rest[:40]!r}); cannot tell where the answer begins"
        )
    after = stripped[len(answer) :]
    end = _through_first_special(after, specials)
    if end is None:
        if not eos:
            raise ChatFormatError(
                "the chat template writes no end-of-turn token after an answer and the "
                "tokenizer has no EOS token: the model could never learn to stop"
            )
        end = eos
    return AnswerFormat(prompt=prompt, lead=rest[: len(rest) - len(stripped)], end=end)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _through_first_special(text: str, specials: Sequence[str]) -> str | None:
    best: tuple[int, str] | None = None
    for tok in specials:
        if not tok:
            continue
        at = text.find(tok)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, tok)
    if best is None:
        return None
    # Whitespace the template puts before the marker is part of the answer's end.
    return text[: best[0] + len(best[1])].strip() or None


def strip_thinking(answer: str) -> str:
    """The answer without its thinking channels (an unclosed one runs to the end): a label the
    model names while thinking is not its answer."""
    for open_, close in THINKING_CHANNELS:
        while open_ in answer:
            start = answer.index(open_)
            end = answer.find(close, start)
            answer = answer[:start] + ("" if end < 0 else answer[end + len(close) :])
        answer = answer.replace(close, "")
    return answer
