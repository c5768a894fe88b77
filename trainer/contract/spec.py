"""The run spec: the one description of a fine-tuning run that the api stores and the trainer runs.

Half of the api <-> trainer contract (docs/architecture.md). It imports nothing heavier than
pydantic because the api image ships this module without torch. Field names are the trainer's flag
names with underscores, so `RunSpec.to_flags()` gives a command line that `python -m trainer`
accepts, and the flags of the original `finetune_and_evaluate.py` script keep working.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trainer.contract.events import MAX_PREDICTIONS

GpuType = Literal["nvidia-l4", "nvidia-rtx-pro-6000"]
GPU_TYPES: tuple[str, ...] = ("nvidia-l4", "nvidia-rtx-pro-6000")

# The language model's attention and MLP projections (Gemma, Llama, Qwen and most VLMs call
# them so).
DEFAULT_TARGET_MODULES = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]

DATASET_KINDS = ("oxford-iiit-pet", "imagefolder", "digits")
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A Hub id ("google/gemma-3-4b-it"), or a local / mounted directory ("/models/gemma", "./tiny").
_MODEL_ID = re.compile(r"^(?:[A-Za-z0-9][\w.\-]*/[\w.\-]+|[\w.\-]+|[./~][^\x00]*)$")


class Dataset(BaseModel):
    """A parsed `dataset` string: `digits`, `oxford-iiit-pet[:/dir]`, `imagefolder:/dir`."""

    kind: Literal["oxford-iiit-pet", "imagefolder", "digits"]
    path: str | None = None

    @classmethod
    def parse(cls, value: str) -> Dataset:
        kind, sep, path = value.partition(":")
        if kind not in DATASET_KINDS:
            raise ValueError(
                f"unknown data set {kind!r}: use one of 'digits', 'oxford-iiit-pet' (the Hub data "
                "set), 'oxford-iiit-pet:/dir' (the original archive layout), 'imagefolder:/dir'"
            )
        if kind == "digits" and sep:
            raise ValueError("'digits' takes no path")
        if kind == "imagefolder" and not path:
            raise ValueError("'imagefolder' needs a directory: 'imagefolder:/path/to/dir'")
        if sep and not path:
            raise ValueError(f"'{kind}:' needs a directory after the colon")
        return cls(kind=kind, path=path or None)


def _bounded(default: Any, ge: float | None = None, le: float | None = None, **kw: Any) -> Any:
    return Field(default, ge=ge, le=le, **kw)


class RunSpec(BaseModel):
    """What to fine-tune, on what, and how. Every field but `model_id` and `dataset` has a
    default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_id: Annotated[str, Field(min_length=1, max_length=300)] = Field(
        description="Hugging Face Hub id or a local directory of an image-text-to-text model"
    )
    dataset: Annotated[str, Field(min_length=1, max_length=500)] = Field(
        description="digits | oxford-iiit-pet | oxford-iiit-pet:/dir | imagefolder:/dir"
    )
    train_size: int = _bounded(1000, ge=1, le=1_000_000, description="training samples")
    # At most what one `evaluation` event carries: the trainer reports every sample in it.
    eval_size: int = _bounded(
        500, ge=1, le=MAX_PREDICTIONS, description="evaluation samples (test split)"
    )
    num_epochs: float = _bounded(1.0, ge=0.01, le=100, description="passes over the training set")
    learning_rate: float = _bounded(2e-4, ge=1e-8, le=1.0)
    batch_size: int = _bounded(8, ge=1, le=512, description="samples per device step")
    gradient_accumulation_steps: int = _bounded(2, ge=1, le=1024)
    eval_batch_size: int = _bounded(16, ge=1, le=512, description="samples per generation batch")
    lora_r: int = _bounded(16, ge=1, le=1024, description="LoRA rank")
    lora_alpha: int = _bounded(32, ge=1, le=4096)
    lora_dropout: float = _bounded(0.05, ge=0.0, le=0.9)
    lora_target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        min_length=1,
        max_length=32,
        description="projection names inside the language model's layers, or all-linear",
    )
    lora_vision: bool = Field(False, description="also put LoRA on the vision tower's projections")
    max_length: int = _bounded(512, ge=16, le=32_768, description="tokens per training example")
    max_new_tokens: int = _bounded(16, ge=1, le=256, description="tokens generated per answer")
    # The step plan (trainer.plan): `auto` picks the micro-batch and checkpointing from the
    # model's estimated activation memory and the GPU's free memory, keeping the effective batch
    # (batch_size x gradient_accumulation_steps); an explicit value wins.
    gradient_checkpointing: bool = Field(
        True, description="allow checkpointing (the plan decides how much); off: never"
    )
    checkpointing: Literal["auto", "none", "selective", "full"] = Field(
        "auto", description="auto | none | selective (every other layer) | full"
    )
    micro_batch_size: Literal["auto"] | Annotated[int, Field(ge=1, le=512)] = Field(
        "auto", description="samples per forward pass; auto: the largest that fits"
    )
    quantization: Literal["nf4", "none", "auto"] = Field(
        "nf4", description="nf4 (QLoRA) | none (bf16 LoRA) | auto (bf16 when it fits with margin)"
    )
    kernels: Literal["auto", "plain"] = Field(
        "auto", description="auto: fused GPU kernels where measured good (Gemma 3); plain: off"
    )
    eval_mode: Literal["score", "generate"] = Field(
        "score", description="score: the likeliest label; generate: free generation, then match"
    )
    merge: bool = Field(
        False,
        description="also save the base model with the adapter merged in, in bf16, for "
        "serving engines that cannot load the adapter",
    )
    save_steps: int = _bounded(50, ge=1, le=1_000_000, description="optimizer steps per checkpoint")
    seed: int = _bounded(42, ge=0, le=2**32 - 1)
    gpu_type: GpuType = "nvidia-l4"
    time_budget_minutes: int = _bounded(
        55, ge=2, le=720, description="wall-clock budget of one execution (segment)"
    )

    @field_validator("model_id")
    @classmethod
    def _check_model_id(cls, value: str) -> str:
        if not _MODEL_ID.match(value) or value.strip() != value:
            raise ValueError(
                "must be a Hugging Face Hub id like 'google/gemma-3-4b-it' or a local directory"
            )
        return value

    @field_validator("dataset")
    @classmethod
    def _check_dataset(cls, value: str) -> str:
        Dataset.parse(value)
        return value

    @field_validator("lora_target_modules")
    @classmethod
    def _check_modules(cls, value: list[str]) -> list[str]:
        if "all-linear" in value:
            if value != ["all-linear"]:
                raise ValueError("'all-linear' stands alone: it already means every projection")
            return value
        bad = [m for m in value if not _MODULE_NAME.match(m)]
        if bad:
            raise ValueError(f"not a module name: {', '.join(map(repr, bad))}")
        if len(set(value)) != len(value):
            raise ValueError("lists a module twice")
        return value

    @property
    def data(self) -> Dataset:
        return Dataset.parse(self.dataset)

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps

    # -- command-line flags ------------------------------------------------------------------

    def to_flags(self) -> list[str]:
        """The trainer's command line for this spec (every field, so the trainer's defaults
        can change without changing what a stored run means)."""
        flags: list[str] = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            flag = _flag(name)
            if isinstance(value, bool):
                flags.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, list):
                flags += [flag, ",".join(value)]
            elif isinstance(value, str) and value.startswith("-"):
                # argparse would read "--model-id -x" as a flag with no value.
                flags.append(f"{flag}={value}")
            else:
                flags += [flag, repr(value) if isinstance(value, float) else str(value)]
        return flags

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Declare one flag per field. Values stay strings (or None when absent) so that
        pydantic alone validates them and the error messages are the same as over REST."""
        for name, field in cls.model_fields.items():
            help_text = field.description or ""
            if field.annotation is bool:
                parser.add_argument(
                    _flag(name), dest=name, action=argparse.BooleanOptionalAction, help=help_text
                )
            else:
                parser.add_argument(_flag(name), dest=name, metavar=name.upper(), help=help_text)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> RunSpec:
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            value = getattr(ns, name, None)
            if value is None:
                continue
            if name == "lora_target_modules":
                value = [m.strip() for m in value.split(",") if m.strip()]
            values[name] = value
        return cls.model_validate(values)

    @classmethod
    def from_flags(cls, argv: Sequence[str]) -> RunSpec:
        parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
        cls.add_arguments(parser)
        ns, unknown = parser.parse_known_args(list(argv))
        if unknown:
            raise ValueError(f"unknown flags: {' '.join(unknown)}")
        return cls.from_namespace(ns)


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def field_bounds(name: str, model: type[BaseModel] = RunSpec) -> tuple[float | None, float | None]:
    """(lowest, highest) allowed (`ge`, `le`) for a numeric field of `model`, for error messages
    and forms."""
    lo = hi = None
    for meta in model.model_fields[name].metadata:
        lo = getattr(meta, "ge", lo)
        hi = getattr(meta, "le", hi)
    return lo, hi


_RANGE_ERRORS = frozenset({"greater_than_equal", "less_than_equal"})


def describe_errors(exc: ValidationError, model: type[BaseModel] = RunSpec) -> list[dict[str, str]]:
    """Turn pydantic's errors into `{"field", "message"}` pairs a person can act on: the field's
    path and, for a number of `model` out of a range bounded both ways, the whole allowed range
    (pydantic names one side)."""
    out = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        field = ".".join(loc) or "(body)"
        message = err["msg"].removeprefix("Value error, ")
        lo, hi = (
            field_bounds(loc[0], model) if loc and loc[0] in model.model_fields else (None, None)
        )
        if err["type"] in _RANGE_ERRORS and lo is not None and hi is not None:
            message = f"must be between {_num(lo)} and {_num(hi)} (got {err['input']!r})"
        elif err["type"] == "extra_forbidden":
            whose = "the spec's fields" if model is RunSpec else "the fields"
            message = f"unknown field; {whose} are: {', '.join(model.model_fields)}"
        elif err["type"] == "missing":
            message = "is required"
        out.append({"field": field, "message": message})
    return out


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
