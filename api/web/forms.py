"""The dashboard's forms, built from the models they fill: a `FormField` per field of RunSpec
(or Gates), with its label, input kind, bounds and help read off the model, so a form cannot
drift from what the api accepts; parsing a submitted form back into values, and pydantic's
errors into one message per input. The new-run and template pages use them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from starlette.datastructures import FormData

from api.web.pages import split_list
from trainer.contract.spec import RunSpec, field_bounds


@dataclass(frozen=True)
class FormField:
    name: str  # the input's name, its id (`f-NAME`) and its key in values and errors
    label: str
    kind: Literal["text", "number", "checkbox", "select", "list"]
    required: bool
    help: str
    lo: float | None = None
    hi: float | None = None
    step: str = "1"
    options: tuple[str, ...] = ()
    key: str = ""  # the model's field, when `name` has a prefix ("gates.min_accuracy")
    nullable: bool = False  # left empty means None (a gate that is off), not an error

    @property
    def field(self) -> str:
        return self.key or self.name


FIELD_GROUPS: list[tuple[str, list[str]]] = [
    ("Model and data", ["model_id", "dataset", "train_size", "eval_size"]),
    ("Training", ["num_epochs", "learning_rate", "batch_size", "gradient_accumulation_steps",
                  "max_length", "gradient_checkpointing", "checkpointing", "micro_batch_size",
                  "quantization", "kernels", "save_steps", "seed"]),
    ("LoRA", ["lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_vision"]),
    ("Evaluation", ["eval_mode", "eval_batch_size", "max_new_tokens"]),
    ("Execution", ["gpu_type", "time_budget_minutes"]),
]  # fmt: skip
LABELS = {
    "model_id": "Model",
    "dataset": "Data set",
    "lora_r": "LoRA rank (r)",
    "lora_alpha": "LoRA alpha",
    "lora_dropout": "LoRA dropout",
    "lora_target_modules": "Target modules",
    "lora_vision": "LoRA on the vision tower too",
    "gpu_type": "GPU",
    "num_epochs": "Epochs",
    "max_new_tokens": "Max new tokens",
    "time_budget_minutes": "Time budget per segment (minutes)",
}


def spec_fields() -> list[tuple[str, list[FormField]]]:
    """The form, derived from `RunSpec.model_fields`: a field added to the spec shows up here
    (under "Other" until it is given a group) without touching the template."""
    fields = RunSpec.model_fields
    grouped = [name for _, names in FIELD_GROUPS for name in names]
    groups = [(title, [n for n in names if n in fields]) for title, names in FIELD_GROUPS]
    other = [n for n in fields if n not in grouped]
    if other:
        groups.append(("Other", other))
    out = []
    for title, names in groups:
        out.append((title, [form_field(n) for n in names]))
    return out


def form_field(
    name: str,
    model: type[BaseModel] = RunSpec,
    prefix: str = "",
    labels: Mapping[str, str] = LABELS,
) -> FormField:
    """The input for one field of `model`, named `prefix + name`."""
    info = model.model_fields[name]
    ann, nullable = _without_none(info.annotation)
    label = labels.get(name, name.replace("_", " ").capitalize())
    common: dict[str, Any] = {
        "name": prefix + name,
        "key": name if prefix else "",
        "nullable": nullable,
        "label": label,
        "required": info.is_required(),
        "help": info.description or "",
    }
    if ann is bool:
        return FormField(kind="checkbox", **common)
    if get_origin(ann) is Literal:
        return FormField(kind="select", options=tuple(str(a) for a in get_args(ann)), **common)
    if get_origin(ann) is list:
        return FormField(kind="list", **common)
    if ann in (int, float):
        lo, hi = field_bounds(name, model)
        return FormField(kind="number", lo=lo, hi=hi, step="1" if ann is int else "any", **common)
    return FormField(kind="text", **common)


def _without_none(ann: Any) -> tuple[Any, bool]:
    """(`X`, True) for `X | None`; (ann, False) for anything else."""
    if get_origin(ann) in (Union, UnionType):
        args = [a for a in get_args(ann) if a is not NoneType]
        if len(args) == 1 and len(get_args(ann)) == 2:
            return args[0], True
    return ann, False


def spec_defaults(base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, info in RunSpec.model_fields.items():
        if base is not None and name in base:
            values[name] = base[name]
        elif not info.is_required():
            values[name] = info.get_default(call_default_factory=True)
        else:
            values[name] = ""
    return {k: form_value(v) for k, v in values.items()}


def form_value(v: Any) -> Any:
    """A stored value as its input shows it."""
    if isinstance(v, bool):
        return v
    if isinstance(v, list):
        return ", ".join(str(x) for x in v)
    if isinstance(v, float):
        return repr(v)
    return "" if v is None else str(v)


def parse_fields(form: FormData, fields: list[FormField]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(values to show again by input name, model input by field) from a submitted form."""
    shown: dict[str, Any] = {}
    data: dict[str, Any] = {}
    for f in fields:
        raw = form.get(f.name)
        text = raw.strip() if isinstance(raw, str) else ""
        if f.kind == "checkbox":
            # An unchecked box sends nothing; the form always has every field, so absent = off.
            shown[f.name] = data[f.field] = text in ("on", "true", "1")
        elif f.kind == "list":
            shown[f.name], data[f.field] = text, split_list(text)
        elif not text and (f.required or f.nullable):
            # Left out: "is required" for a required field, None (the default) for a nullable.
            shown[f.name] = ""
        else:
            # Passed on as typed: an emptied number is an error to show, not a default.
            shown[f.name] = data[f.field] = text
    return shown, data


def field_errors(errors: list[dict[str, str]], nested: tuple[str, ...] = ()) -> dict[str, str]:
    """The first message for each input. A field inside one of `nested` keeps its prefix
    ("body.gates.min_accuracy" is the input "gates.min_accuracy")."""
    out: dict[str, str] = {}
    for err in errors:
        # "body.spec.gpu_type" (from the service) and "spec.gpu_type" both mean the gpu_type field.
        parts = err["field"].split(".")
        while len(parts) > 1 and parts[0] in ("body", "spec"):
            parts = parts[1:]
        key = ".".join(parts[:2]) if parts[0] in nested and len(parts) > 1 else parts[0]
        out.setdefault(key, err["message"])
    return out
