"""A lossless word-level tokenizer holding a family's real special tokens, for tiny checkpoints.

The real vocabularies are 150k-260k entries; a tiny model needs only the words our prompts, the
labels and the family's chat template use. Saved as `PreTrainedTokenizerFast`: the families' own
fast classes are BPE-only in transformers 5 and would reload a word-level vocabulary as BPE
(/work/shared/notes/tiny-gemma3.md, trap 3). What the trainer reads from a tokenizer (special
tokens and their ids, the chat template, eos/pad) is the family's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from trainer.tiny import DIGIT_LABELS, PROMPT_WORDS, PUNCTUATION, word_level_tokenizer

_WORD = re.compile(r"\w+|[^\w\s]")


def words_of(*texts: str) -> list[str]:
    out: list[str] = []
    for text in texts:
        for token in _WORD.findall(text.replace("_", " ")):
            if token not in out:
                out.append(token)
    return out


def build(
    specials: Sequence[str],
    template_words: str,
    *,
    labels: Iterable[str] = DIGIT_LABELS,
    bos: str | None,
    eos: str,
    pad: str,
    unk: str | None = None,
    extra: dict[str, str] | None = None,
    chat_template: str | None = None,
) -> Any:
    """`specials` first (in the family's order), then whitespace, punctuation and words."""
    words = [" ", "\n", "\n\n", *PUNCTUATION, *words_of(PROMPT_WORDS, template_words, *labels)]
    return word_level_tokenizer(
        specials,
        words,
        bos=bos,
        eos=eos,
        unk=unk or "<unk>",
        pad=pad,
        extra=extra,
        chat_template=chat_template,
    )
