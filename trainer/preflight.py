"""Fail before paying: everything about a model that can be checked without its weights.

Runs first in every segment, in seconds: the processor loads (its packages are installed), the
chat template gives a place for the answer and an end marker that is one token, and the LoRA
targets resolve on the model built on the meta device from its config. Only config.json and the
processor's files are read (downloaded, for a Hub id); a run that cannot work fails here with
the model's name and the fix, before any weight is downloaded or any evaluation runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer import model as model_setup
from trainer import prompts
from trainer.contract.chat import ChatFormatError
from trainer.contract.spec import RunSpec

PROBE_LABELS = ("zebra", "yak")  # stand-ins for labels not yet loaded: the format is the same


class PreflightError(ValueError):
    pass


@dataclass(frozen=True)
class Checked:
    model_type: str
    end: str  # the end-of-answer marker the model must learn (prompts.Format.end)
    prefix_lm: bool
    lora_modules: int
    projector: list[str]

    def summary(self) -> str:
        style = "prefix-LM (prompt, then the label as a suffix)" if self.prefix_lm else "chat"
        return (
            f"{self.model_type}, {style}, answers end with {self.end!r}, LoRA on "
            f"{self.lora_modules} modules, projector trained in full: "
            f"{', '.join(self.projector) or 'none'}"
        )


def check(spec: RunSpec) -> Checked:
    name = spec.model_id
    config = _config(name)
    processor = _processor(name)
    try:
        fmt = prompts.prompt_format(processor, PROBE_LABELS)
    except (ChatFormatError, ValueError) as exc:
        raise PreflightError(
            f"{name}: {exc}. Fix: use the model's instruction-tuned variant (its chat template "
            "has an assistant turn), or give the processor a chat template"
        ) from exc
    tok = prompts.tokenizer_of(processor)
    if len(tok(fmt.end, add_special_tokens=False).input_ids) != 1:
        raise PreflightError(
            f"{name}: an answer ends with {fmt.end!r}, which is not one token of its "
            "tokenizer, so generation cannot stop on it. Fix: a tokenizer whose end-of-turn "
            "marker is a special token"
        )
    targets = resolve_on_meta(spec, config)
    return Checked(
        model_type=config.model_type,
        end=fmt.end,
        prefix_lm=fmt.prefix_lm,
        lora_modules=len(targets.lora),
        projector=targets.projector,
    )


def _config(name: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as exc:
        raise PreflightError(
            f"{name}: its config.json cannot be read ({exc}). Fix: check the model id or "
            "directory, and HF_TOKEN for a gated model"
        ) from exc


def _processor(name: str) -> Any:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name)
    except ImportError as exc:
        raise PreflightError(
            f"{name}: its processor needs a package that is not installed ({exc}). Fix: "
            "install the trainer extra (`pip install tuneplane[trainer]`), which holds the "
            "processors' packages (torchvision, num2words)"
        ) from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PreflightError(f"{name}: its processor does not load ({exc})") from exc


def resolve_on_meta(spec: RunSpec, config: Any) -> model_setup.Targets:
    """The LoRA targets on the model built from its config on the meta device: module names
    without a single weight allocated."""
    try:
        meta = model_setup.meta_model(spec.model_id)
    except ValueError as exc:
        raise PreflightError(
            f"{spec.model_id}: {type(config).__name__} is not an image-text-to-text model "
            f"({exc}). Fix: choose a vision-language checkpoint"
        ) from exc
    try:
        return model_setup.resolve_targets(meta, spec)
    except model_setup.TargetError as exc:
        raise PreflightError(f"{exc}. Fix: change --lora-target-modules / --lora-vision") from exc
