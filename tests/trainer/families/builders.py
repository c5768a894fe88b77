"""Tiny random-weight checkpoints of each family, in the family's real classes (config, model,
processor, image and video processors), with its real special tokens and chat template
structure (templates.py). Widths are tiny so the whole suite trains on two CPU cores; everything
the trainer reads (module names, token ids, templates, processor behaviour) is the family's.

Each builder writes a checkpoint directory that reloads through `AutoProcessor` and
`AutoModelForImageTextToText`, exactly as a Hub download would.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.trainer.families.gemma import gemma3, gemma4_e, gemma4_thinking
from tests.trainer.families.llava import llava, llava_next
from tests.trainer.families.paligemma import paligemma, paligemma2
from tests.trainer.families.qwen import qwen2_5_vl, qwen3_vl
from tests.trainer.families.smolvlm import smolvlm, smolvlm2

FAMILIES: dict[str, Callable[[Path], Path]] = {
    "gemma3": gemma3,
    "gemma4-e": gemma4_e,
    "gemma4-thinking": gemma4_thinking,
    "qwen2.5-vl": qwen2_5_vl,
    "qwen3-vl": qwen3_vl,
    "smolvlm": smolvlm,
    "smolvlm2": smolvlm2,
    "paligemma": paligemma,
    "paligemma2": paligemma2,
    "llava": llava,
    "llava-next": llava_next,
}
