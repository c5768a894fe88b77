"""The merged model: the base model's weights with the adapter added in, saved in bf16.

An extra artifact for serving engines that cannot load a LoRA adapter on this architecture (the
original project adds it for Gemma 4). The base is loaded again, unquantized, in bf16 on the
CPU: merging into 4-bit weights would round the adapter away, and the GPU still holds the
training model. It needs host memory for the bf16 model (about 2 bytes per parameter).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def write_merged(model_id: str, adapter_dir: Path, processor: Any, out: Path) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(model_id, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return out
