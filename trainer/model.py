"""Loading a vision-language model for (Q)LoRA fine-tuning.

CUDA: 4-bit NF4 weights with double quantization and bf16 compute (QLoRA). CPU: fp32, no
quantization (bitsandbytes' 4-bit kernels are CUDA's; the CPU path is for tests and the demo).

LoRA targets are full module names found in the model itself (`resolve_targets`): the language
model is whatever `get_decoder()` returns (`language_model`, SmolVLM's `text_model`), so `q_proj`
never also hits the vision tower's projections (peft would match a bare list as suffixes); the
vision tower is added only when the spec asks for it. The projector is trained in full (peft
`modules_to_save`): it is small, it is what maps the image into the language model, and a freshly
initialised Gemma 3 projector is all zeros, so without it a model never learns to look.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trainer import kernels, quiet
from trainer.contract.spec import RunSpec
from trainer.plan import StepPlan, apply_checkpointing

quiet.install()  # before transformers, peft and bitsandbytes load (trainer/quiet.py says why)

# Where a family keeps its vision tower, on the inner model (Gemma, LLaVA, PaliGemma: vision_tower;
# Qwen-VL: visual; Idefics3 / SmolVLM: vision_model). The language model is `get_decoder()`.
VISION_TOWERS = ("vision_tower", "visual", "vision_model")
# Projectors that live inside the vision tower rather than beside it (Qwen-VL's patch merger,
# Qwen3-VL's DeepStack mergers); every other child of the inner model that is neither the
# language model nor a tower is a projector (multi_modal_projector, connector, embed_vision).
VISION_INNER_PROJECTORS = ("merger", "deepstack_merger_list")
ALL_LINEAR = "all-linear"


class TargetError(ValueError):
    """A LoRA request that matches nothing (or part of it matches nothing)."""


@dataclass(frozen=True)
class Targets:
    lora: list[str]  # full module names given LoRA adapters
    projector: list[str]  # full module names trained in full (peft modules_to_save)


@dataclass
class Loaded:
    model: Any  # a peft PeftModel around the base model
    processor: Any
    device: torch.device
    quantized: bool
    trainable_params: int
    total_params: int
    plan: StepPlan | None = None
    kernels: str = kernels.PLAIN  # trainer.kernels: which kernels run

    @property
    def weights(self) -> str:
        if self.quantized:
            return "4-bit NF4"
        return "bf16" if self.device.type == "cuda" else "fp32"


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


# Kept in bf16 under NF4 besides the modules the caller names (transformers matches these
# from the module name's start, as regexes): the output head (bitsandbytes' own default) and the
# vision tower: ~0.4 B parameters for every Gemma 3 size, whose 4-bit dequantization per matmul
# made the frozen tower's forward (a third of a step's FLOPs) the slowest part of a step.
NF4_SKIP = ["lm_head", r".*(?:vision_tower|vision_model|visual)"]


def meta_model(model_id: str) -> Any:
    """The model built from its config.json on the meta device: every module, no weight."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_id)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def load_base(
    model_id: str, device: torch.device, keep: Sequence[str] = (), quantize: bool = True
) -> Any:
    """The base model: on CUDA 4-bit except the modules in `keep` (the projector, which is
    trained in full and so must stay in bf16: a 4-bit weight cannot take gradients) and
    NF4_SKIP, or all bf16 without `quantize`; fp32 on the CPU."""
    from transformers import AutoModelForImageTextToText

    if device.type == "cuda" and not quantize:
        # bf16 LoRA (quantization: none, or auto where it fits): no dequantization per matmul.
        return AutoModelForImageTextToText.from_pretrained(
            model_id, dtype=torch.bfloat16, device_map={"": device.index or 0}
        )
    if device.type == "cuda":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            # Naming modules replaces the default list, which holds the output head.
            llm_int8_skip_modules=[*keep, *NF4_SKIP],
        )
        return AutoModelForImageTextToText.from_pretrained(
            model_id,
            quantization_config=quant,
            dtype=torch.bfloat16,
            device_map={"": device.index or 0},
        )
    return AutoModelForImageTextToText.from_pretrained(model_id, dtype=torch.float32)


def _named(model: Any, module: Any) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise TargetError(f"{type(model).__name__}: cannot find its language model among its modules")


def _layer_linears(model: Any, prefix: str) -> list[tuple[str, str]]:
    """(full name, leaf name) of the linear layers inside `prefix`'s numbered layers/blocks."""
    layer = re.compile(rf"{re.escape(prefix)}\.(?:.*\.)?\d+\.(.*\.)?(\w+)")
    out = []
    for name, module in model.named_modules():
        m = layer.fullmatch(name)
        if m and _is_linear(module):
            out.append((name, m.group(2)))
    return out


def resolve_targets(model: Any, spec: RunSpec) -> Targets:
    """Where LoRA goes and what is trained in full, from the model's own modules: the named
    projections of the language model's layers (every linear layer for `all-linear`), every
    linear layer of the vision tower's blocks when `lora_vision` is asked for, and the
    projector(s). Works on a model built on the meta device (the preflight) as on the loaded
    one. Every requested name must match something: a typo is an error, not a silent no-op."""
    kind = type(model).__name__
    language = _named(model, model.get_decoder())
    inner = getattr(model, "model", model)
    inner_name = _named(model, inner) if inner is not model else ""
    lm_linears = _layer_linears(model, language)
    wanted = spec.lora_target_modules
    if wanted == [ALL_LINEAR]:
        lora = [n for n, _ in lm_linears]
    else:
        lora = [n for n, leaf in lm_linears if leaf in wanted]
        missing = [w for w in wanted if not any(leaf == w for _, leaf in lm_linears)]
        if missing:
            names = sorted({leaf for _, leaf in lm_linears})
            raise TargetError(
                f"{spec.model_id} ({kind}): no linear layer named {', '.join(missing)} in its "
                f"language model's layers ({language}); its names are: {', '.join(names)} "
                f"(or use --lora-target-modules {ALL_LINEAR})"
            )
    if not lora:
        raise TargetError(f"{spec.model_id} ({kind}): no linear layer in {language}'s layers")
    vision_attr = next((a for a in VISION_TOWERS if getattr(inner, a, None) is not None), None)
    vision = f"{inner_name}.{vision_attr}".lstrip(".") if vision_attr else None
    projector = [
        f"{inner_name}.{child}".lstrip(".")
        for child, module in inner.named_children()
        if f"{inner_name}.{child}".lstrip(".") not in (language, vision)
        and "audio" not in child
        and any(True for _ in module.parameters())
    ]
    if vision_attr:
        tower = getattr(inner, vision_attr)
        for n in VISION_INNER_PROJECTORS:
            found = getattr(tower, n, None)
            if isinstance(found, torch.nn.ModuleList):  # peft saves modules, not lists of them
                projector += [f"{vision}.{n}.{i}" for i in range(len(found))]
            elif found is not None:
                projector.append(f"{vision}.{n}")
    if spec.lora_vision:
        if vision is None:
            raise TargetError(
                f"{spec.model_id} ({kind}): --lora-vision asked for, but the model has no "
                f"vision tower under any of {', '.join(VISION_TOWERS)}"
            )
        inside = [n for n, _ in _layer_linears(model, vision)]
        inside = [n for n in inside if not any(n.startswith(p + ".") for p in projector)]
        if not inside:
            raise TargetError(
                f"{spec.model_id} ({kind}): --lora-vision asked for, but {vision} has no "
                "linear layer inside numbered blocks"
            )
        lora += inside
    return Targets(lora=lora, projector=projector)


def lora_config(spec: RunSpec, targets: Targets) -> Any:
    from peft import LoraConfig

    # Full names, anchored: a list of names would match as suffixes (notes, trap 2).
    pattern = "|".join(re.escape(n) for n in targets.lora)
    return LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=f"(?:{pattern})",
        modules_to_save=targets.projector or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def load(spec: RunSpec, device: torch.device, plan: StepPlan | None = None) -> Loaded:
    """`plan` (trainer.plan) picks the weights' quantization and the checkpointing; without one,
    CUDA means NF4 with full checkpointing (when the spec allows it), the CPU neither."""
    from peft import get_peft_model

    kernels.restore()  # built from transformers' own classes, whatever an earlier load fused
    processor = load_processor(spec.model_id)
    cuda = device.type == "cuda"
    quantized = cuda and (plan.quantization == "nf4" if plan else True)
    keep = resolve_targets(meta_model(spec.model_id), spec).projector if quantized else []
    base = load_base(spec.model_id, device, keep, quantize=quantized)
    mode = plan.checkpointing if plan else "full" if spec.gradient_checkpointing else "none"
    if quantized:
        from peft import prepare_model_for_kbit_training

        # Checkpointing is applied below, the same way for both weight kinds.
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    if cuda or plan:
        apply_checkpointing(base, mode)
    fused = kernels.fuse(base, device, spec.kernels)

    config = lora_config(spec, resolve_targets(base, spec))
    model = get_peft_model(base, config)
    if device.type == "cpu":
        model.to(device)
    elif not quantized:
        # bf16 weights give bf16 adapters; AdamW keeps them in fp32 (as for QLoRA), autocast
        # does the matmuls in bf16.
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return Loaded(model, processor, device, quantized, trainable, total, plan, fused)


def _is_linear(module: Any) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear")


def end_of_turn_ids(model: Any, processor: Any, end_marker: str) -> list[int]:
    """Token ids that end an answer: the model's own EOS ids (generation_config), the
    tokenizer's EOS, and the end marker the chat template writes after an answer (prompts'
    Format.end), so generation stops right after the label whatever the family."""
    tokenizer = getattr(processor, "tokenizer", processor)
    ids: list[int] = []
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is not None:
        ids += eos if isinstance(eos, list) else [eos]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    marker = tokenizer(end_marker, add_special_tokens=False).input_ids
    if len(marker) == 1:
        ids.append(marker[0])
    return sorted(set(ids))
