"""Prompt formatting: one user turn (the image and an instruction listing the labels), one answer
(the label). Through the processor's own chat template, so the trainer formats exactly as the
model was instruction-tuned; a processor without one (PaliGemma) is a prefix-LM: the prompt is
a prefix, the label a suffix (`suffix=`), and the processor marks which is which.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trainer.contract.chat import AnswerFormat, answer_format, instruction, messages

__all__ = ["Format", "instruction", "messages", "prompt_format", "prompt_text"]


def tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def special_tokens(processor: Any) -> list[str]:
    """Every special token the tokenizer knows, named or only registered as added tokens."""
    tok = tokenizer_of(processor)
    named = list(getattr(tok, "all_special_tokens", []))
    added = [t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special]
    return list(dict.fromkeys([*named, *added]))


def is_prefix_lm(processor: Any) -> bool:
    """No chat template, but a processor that takes the answer as `suffix` (PaliGemma)."""
    import inspect

    if getattr(processor, "chat_template", None):
        return False
    return "suffix" in inspect.signature(processor.__call__).parameters


@dataclass(frozen=True)
class Format:
    """How one model is prompted: `prompt` is what generation starts from, `end` what the model
    emits after a label to stop (trained on, and a stop token in evaluation)."""

    prompt: str
    lead: str
    end: str
    prefix_lm: bool

    def answer_text(self, answer: str) -> str:
        """What the model writes: the answer, then what ends it."""
        return self.lead + answer + self.end


def prompt_format(processor: Any, labels: Sequence[str]) -> Format:
    """Raises ChatFormatError (a ValueError) when the template gives no place for the answer."""
    tok = tokenizer_of(processor)
    if is_prefix_lm(processor):
        # PaliGemma's processor puts the image tokens and BOS first and "\n" after the prefix,
        # and appends EOS to the suffix itself.
        image = getattr(processor, "image_token", "<image>")
        return Format(image + instruction(labels), "", tok.eos_token, prefix_lm=True)
    if not getattr(processor, "chat_template", None):
        raise ValueError(
            "the processor has no chat template and does not take a `suffix`: there is no way "
            "to tell the model where its answer goes"
        )
    probe = labels[0] if labels else "answer"
    fmt: AnswerFormat = answer_format(
        processor.apply_chat_template(messages(labels), tokenize=False, add_generation_prompt=True),
        processor.apply_chat_template(messages(labels, probe), tokenize=False),
        probe,
        special_tokens(processor),
        tok.eos_token,
    )
    return Format(fmt.prompt, fmt.lead, fmt.end, prefix_lm=False)


def prompt_text(processor: Any, labels: Sequence[str]) -> str:
    """The prompt generation starts from."""
    return prompt_format(processor, labels).prompt
