"""A tiny random-weight Gemma 3 checkpoint, built offline, that loads like a real one.

Tests and the embedded demo cannot reach the Hugging Face Hub, so they train this instead: a
`Gemma3ForConditionalGeneration` with a ~250k-parameter config, a word-level tokenizer holding
Gemma's special tokens plus the prompt and label words, a `Gemma3Processor` at 32x32 pixels and a
chat template in Gemma's turn format. It goes through the same `AutoProcessor` /
`AutoModelForImageTextToText.from_pretrained` calls as `google/gemma-3-4b-it`.

    python -m trainer.tiny PATH [--labels a,b,c]

Pitfalls this module works around are in /work/shared/notes/tiny-gemma3.md (kept in comments
below where they matter).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

# The labels of scikit-learn's digits (trainer.data gives them these names).
DIGIT_LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Gemma's special tokens, in Gemma's order for the first few ids (pad 0, eos 1, bos 2, unk 3).
PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
BOI, EOI, IMAGE_SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
SPECIAL_TOKENS = [PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN, BOI, EOI, IMAGE_SOFT]

# Gemma 3's chat template, reduced to what it does for text and images: a system message is
# prepended to the first user turn, the assistant role is called "model", every turn ends with
# <end_of_turn> and a newline, and an image is one <start_of_image> marker (the processor expands
# it into the soft tokens).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    "{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)

# Words the trainer's prompt uses (trainer.prompts); anything else becomes <unk>, which is fine
# for a model that only ever sees our prompts.
PROMPT_WORDS = (
    "What is in this image ? Answer with exactly one of these labels : , . and only the label "
    "Which class does the picture show ? Reply with one label from this list"
)
PUNCTUATION = list(",.:;?!'\"-_()/")

IMAGE_SIZE = 32
PATCH_SIZE = 8
TOKENS_PER_IMAGE = 16  # (32/8)^2 patches, pooled 1:1; must be a square
_MARKER = "tiny-gemma3.json"


def build_tiny_model(path: pathlib.Path, labels: list[str] | None = None) -> pathlib.Path:
    """Write a tiny Gemma 3 checkpoint to `path` (idempotent) and return `path`.

    A complete checkpoint (its marker file is written last, after the weights, the tokenizer and
    the processor) with the same vocabulary is left alone, so a session fixture and the demo can
    call this freely. The build happens in a sibling temporary directory that is renamed into
    place, so an interrupted build never looks complete.
    """
    path = pathlib.Path(path)
    words = vocabulary(labels if labels is not None else DIGIT_LABELS)
    marker = path / _MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("words") == words:
                return path
        except (OSError, ValueError):
            pass  # unreadable marker: rebuild
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        _write_checkpoint(tmp, words)
        (tmp / _MARKER).write_text(json.dumps({"words": words}))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def vocabulary(labels: Iterable[str]) -> list[str]:
    """The ordinary (non-special) tokens: whitespace, punctuation, prompt and label words."""
    words: list[str] = [" ", "\n", "\n\n", *PUNCTUATION]
    for text in (PROMPT_WORDS, *labels, "user model system"):
        for word in text.replace("_", " ").split():
            for token in _split_words(word):
                if token not in words:
                    words.append(token)
    return words


def _split_words(text: str) -> list[str]:
    import re

    return re.findall(r"\w+|[^\w\s]", text)


def build_tokenizer(words: Sequence[str]) -> Any:
    """Gemma's special tokens, in Gemma's order, then `words` (see `word_level_tokenizer`)."""
    return word_level_tokenizer(
        SPECIAL_TOKENS,
        words,
        bos=BOS,
        eos=EOS,
        unk=UNK,
        pad=PAD,
        # Gemma3Processor reads these names (and their ids) from the tokenizer.
        extra={"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE_SOFT},
        chat_template=CHAT_TEMPLATE,
    )


def word_level_tokenizer(
    specials: Sequence[str],
    words: Sequence[str],
    *,
    bos: str | None,
    eos: str,
    unk: str,
    pad: str,
    extra: dict[str, str] | None = None,
    chat_template: str | None = None,
) -> Any:
    """A lossless word-level tokenizer: spaces and newlines are tokens of their own and the
    decoder concatenates, so `decode(encode(text)) == text` for in-vocabulary text (the collator
    test relies on it). `specials` take the first ids, in their order; ids are dense.

    Saved as `PreTrainedTokenizerFast`: `GemmaTokenizerFast` is BPE-only in transformers 5 and
    would reload this vocabulary as BPE, turning every word into <unk>.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ordered = list(dict.fromkeys([*specials, unk]))
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys([*ordered, *words]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    # "\n\n" first so it stays one token, as in Gemma's vocabulary (the processor puts it around
    # images); any longer run of newlines splits into known tokens.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n\n|\n|\s|\w+|[^\w\s]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    # Registered on the backend itself so the turn markers are matched before pre-tokenization
    # (transformers 5 keeps `additional_special_tokens` only as names).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ordered])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        extra_special_tokens=extra or {},
        padding_side="right",
        model_max_length=8192,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def build_processor(
    tokenizer: Any, image_size: int = IMAGE_SIZE, tokens_per_image: int = 16
) -> Any:
    """A Gemma3Processor around `tokenizer`. The PIL image processor needs no torchvision (the
    default one does), and AutoProcessor falls back to it anyway when torchvision is missing."""
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size}, do_pan_and_scan=False
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=tokens_per_image,
    )


def tiny_config(tokenizer: Any) -> Any:
    from transformers import Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=1024,
        sliding_window=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    vision = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
    )
    return gemma3_config(tokenizer, text, vision, TOKENS_PER_IMAGE)


def gemma3_config(tokenizer: Any, text: Any, vision: Any, tokens_per_image: int) -> Any:
    """Tie a Gemma3Config's special ids to `tokenizer`: the model's `image_token_index` is the
    soft token's id (the processor's `image_token_id` is the begin-of-image id — not the same)."""
    from transformers import Gemma3Config

    return Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=tokenizer.convert_tokens_to_ids(BOI),
        eoi_token_index=tokenizer.convert_tokens_to_ids(EOI),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_SOFT),
    )


def generation_config(tokenizer: Any) -> Any:
    """Generation stops at <end_of_turn> (after the label), as with the real Gemma 3 -it models."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)],
        do_sample=False,
    )


def init_projector(model: Any, seed: int = 0) -> None:
    """Gemma 3 initialises the multi-modal projector to zeros, so a freshly built model cannot see
    the image at all; small random values give training something to start from."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    weight = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=gen) * 0.02)


def _write_checkpoint(out: pathlib.Path, words: list[str]) -> None:
    import torch
    from transformers import Gemma3ForConditionalGeneration

    tokenizer = build_tokenizer(words)
    processor = build_processor(tokenizer)
    torch.manual_seed(0)  # same vocabulary, same weights: builds are reproducible
    model = Gemma3ForConditionalGeneration(tiny_config(tokenizer))
    init_projector(model)
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.tiny", description="Write a tiny random-weight Gemma 3 checkpoint."
    )
    parser.add_argument("path", type=pathlib.Path)
    parser.add_argument(
        "--labels",
        default=",".join(DIGIT_LABELS),
        help="comma-separated label names to put in the vocabulary (default: the digit names)",
    )
    args = parser.parse_args(argv)
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    path = build_tiny_model(args.path, labels)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
