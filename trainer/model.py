"""Loading a vision-language model for (Q)LoRA fine-tuning.

CUDA: 4-bit NF4 weights with double quantization and bf16 compute (QLoRA). CPU: fp32, no
quantization (bitsandbytes' 4-bit kernels are CUDA's; the CPU path is for tests and the demo).

LoRA targets are a regex anchored at the language model's decoder layers. peft matches a list of
names as suffixes, so `q_proj` alone would also hit the SigLIP vision tower's projections; the
vision tower is added only when the spec asks for it. The multi-modal projector is trained in full
(peft `modules_to_save`): it is small, it is what maps the image into the language model, and a
freshly initialised Gemma 3 projector is all zeros, so without it a model never learns to look.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from trainer import quiet
from trainer.contract.spec import RunSpec

quiet.install()  # before transformers, peft and bitsandbytes load (trainer/quiet.py says why)

# Names of the module that maps vision features into the language model, across VLM families
# (Gemma 3 / LLaVA, Idefics 3 / SmolVLM, Qwen2-VL).
PROJECTOR_NAMES = ("multi_modal_projector", "connector", "merger", "mm_projector")
# A vision tower's own projection names (SigLIP / CLIP / ViT), added to the spec's modules.
VISION_EXTRA_TARGETS = ("out_proj", "fc1", "fc2")
LANGUAGE_PREFIX = r"(?:.*\.)?language_model\.(?:.*\.)?layers\.\d+\.(?:.*\.)?"
VISION_PREFIX = r"(?:.*\.)?(?:vision_tower|vision_model|visual)\.(?:.*\.)?layers\.\d+\.(?:.*\.)?"


@dataclass
class Loaded:
    model: Any  # a peft PeftModel around the base model
    processor: Any
    device: torch.device
    quantized: bool
    trainable_params: int
    total_params: int


class NoCudaError(RuntimeError):
    """`--device cuda` without a usable GPU: a dispatcher that asks for CUDA wants QLoRA on a
    GPU, and a silent fp32 run on the CPU would take days and measure nothing useful."""


def pick_device(choice: str = "auto") -> torch.device:
    """`auto`: the first GPU when CUDA is visible, else the CPU (fp32). `cuda`: the first GPU,
    or a `NoCudaError` that says why there is none. `cpu`: the CPU."""
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if choice == "cuda":
        raise NoCudaError(
            "--device cuda was asked for, but no CUDA device is visible ("
            + _why_no_cuda()
            + "); use --device auto or cpu to run on the CPU"
        )
    return torch.device("cpu")


def _why_no_cuda() -> str:
    import os

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hidden = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    return f"torch {torch.__version__} built for CUDA {torch.version.cuda} finds no GPU{hidden}"


def cpu_hub_warning(model_id: str, device: torch.device) -> str | None:
    """Said before anything loads: a model that is not a local directory comes from the Hugging
    Face Hub, and on a CPU it trains unquantized and slowly. Offline, the Hub's retries take
    minutes before they fail; this line says up front why, and what runs here instead."""
    import os

    if device.type != "cpu" or os.path.isdir(model_id):
        return None
    return (
        f"{model_id} is not a local directory: it is downloaded from the Hugging Face Hub, "
        "which must be reachable (and HF_TOKEN must grant access to a gated model such as "
        "Gemma), and on this CPU it trains in fp32, for hours on a real model. Without the Hub "
        "or a GPU, give a local model directory: `python -m trainer.tiny DIR` builds the tiny "
        "offline Gemma 3 the demo trains."
    )


def load_processor(model_id: str) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_id)


def load_base(model_id: str, device: torch.device) -> Any:
    from transformers import AutoModelForImageTextToText

    if device.type == "cuda":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        return AutoModelForImageTextToText.from_pretrained(
            model_id,
            quantization_config=quant,
            dtype=torch.bfloat16,
            device_map={"": device.index or 0},
        )
    return AutoModelForImageTextToText.from_pretrained(model_id, dtype=torch.float32)


def lora_target_regex(spec: RunSpec) -> str:
    names = "|".join(re.escape(m) for m in spec.lora_target_modules)
    pattern = f"{LANGUAGE_PREFIX}(?:{names})"
    if spec.lora_vision:
        vision = sorted({*spec.lora_target_modules, *VISION_EXTRA_TARGETS})
        pattern += f"|{VISION_PREFIX}(?:{'|'.join(re.escape(m) for m in vision)})"
    return pattern


def projector_modules(model: Any) -> list[str]:
    found = []
    for name, _ in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in PROJECTOR_NAMES and leaf not in found:
            found.append(leaf)
    return found


def load(spec: RunSpec, device: torch.device) -> Loaded:
    from peft import LoraConfig, get_peft_model

    processor = load_processor(spec.model_id)
    base = load_base(spec.model_id, device)
    quantized = device.type == "cuda"
    checkpointing = spec.gradient_checkpointing and device.type == "cuda"
    if quantized:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=checkpointing,
            # Non-reentrant checkpointing works with frozen inputs and peft's wrappers.
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    target = lora_target_regex(spec)
    matched = [n for n, _ in base.named_modules() if re.fullmatch(target, n)]
    if not matched:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if _is_linear(m)})
        raise ValueError(
            f"no module of {spec.model_id} matches the LoRA targets {spec.lora_target_modules} "
            f"inside the language model's layers; its linear layers are named: {', '.join(linear)}"
        )
    config = LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=target,
        modules_to_save=projector_modules(base) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    if device.type == "cpu":
        model.to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return Loaded(model, processor, device, quantized, trainable, total)


def _is_linear(module: Any) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear")


def end_of_turn_ids(model: Any, processor: Any) -> list[int]:
    """Token ids that end an answer: the model's own EOS ids plus the chat template's end-of-turn
    marker when the tokenizer has one, so generation stops right after the label."""
    tokenizer = getattr(processor, "tokenizer", processor)
    ids: list[int] = []
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is not None:
        ids += eos if isinstance(eos, list) else [eos]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    for marker in ("<end_of_turn>", "<|im_end|>", "<end_of_utterance>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.append(tid)
    return sorted(set(ids))
