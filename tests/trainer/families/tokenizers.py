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

from trainer.tiny import DIGIT_LABELS, PROMPT_WORDS, PUNCTUATION

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
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    unk_token = unk or "<unk>"
    ordered = list(dict.fromkeys([*specials, unk_token]))
    words = [" ", "\n", "\n\n", *PUNCTUATION, *words_of(PROMPT_WORDS, template_words, *labels)]
    everything = list(dict.fromkeys([*ordered, *words]))  # ids must be dense: no duplicates
    vocab = {tok: i for i, tok in enumerate(everything)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n\n|\n|\s|\w+|[^\w\s]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ordered])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk_token,
        pad_token=pad,
        extra_special_tokens=extra or {},
        padding_side="right",
        model_max_length=8192,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast
