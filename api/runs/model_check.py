"""The create-run check of a model that needs no torch: its config.json and chat template.

Read from a local model directory, or from the Hub over HTTP (`settings.hub_url`, the same
`/{id}/resolve/main/{file}` paths `huggingface_hub` uses), with a short timeout: a model whose
files cannot be read (offline, gated, a directory only the trainer's machine mounts) is not
refused here, the trainer's own preflight checks it before paying for anything. What is
checked is what the trainer's preflight checks first (trainer/preflight.py), with the same rule
(trainer.contract.chat.answer_format): the config is a vision-language model's, and the chat
template gives a place for the answer and a way to end it. The template is rendered with
jinja2's sandbox, as transformers renders it; the api already depends on jinja2, the contract
does not (it stays pydantic-only).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from api.errors import Problem
from api.runs.local_paths import LocalPaths, is_local_model
from trainer.contract.chat import ChatFormatError, answer_format, messages

FILES = ("config.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json")
TIMEOUT_SECONDS = 5.0
PROBE_LABELS = ("zebra", "yak")
# Families prompted as prefix and suffix, without a chat template.
PREFIX_LM_TYPES = frozenset({"paligemma"})
# A special-token-shaped piece of text (<end_of_turn>, <|im_end|>, </s>), for templates whose
# tokenizer.json (the full list of special tokens) is not read (the Hub's can be 30 MB).
_TOKEN_SHAPE = re.compile(r"<[A-Za-z0-9_|/\-]+>")
_GENERATION_TAGS = re.compile(r"{%-?\s*(?:end)?generation\s*-?%}")


@dataclass
class ModelFiles:
    config: dict[str, Any]
    tokenizer: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    specials: list[str] = field(default_factory=list)


def read_files(model_id: str, hub_url: str, paths: LocalPaths) -> ModelFiles | None:
    # A local directory is read only under the data roots: what is read, or not, must not tell
    # the caller about the rest of this machine's disk (api/runs/local_paths.py).
    local = paths.inside(model_id) if is_local_model(model_id) else None
    if local is not None and local.is_dir():
        texts = {name: _read_local(local / name) for name in (*FILES, "tokenizer.json")}
    elif hub_url and re.fullmatch(r"[\w.\-]+/[\w.\-]+", model_id):
        texts = _read_hub(model_id, hub_url.rstrip("/"))
    else:
        return None
    config = _json(texts.get("config.json"))
    if not config:
        return None
    tokenizer = _json(texts.get("tokenizer_config.json")) or {}
    files = ModelFiles(config=config, tokenizer=tokenizer, template=_template(texts, tokenizer))
    added = (_json(texts.get("tokenizer.json")) or {}).get("added_tokens", [])
    named = [_content(tokenizer.get(k)) for k in ("bos_token", "eos_token", "pad_token")]
    extra = tokenizer.get("extra_special_tokens") or {}
    named += list(extra.values()) if isinstance(extra, dict) else list(extra)
    named += tokenizer.get("additional_special_tokens") or []
    files.specials = [t for t in [*named, *(a["content"] for a in added if a.get("special"))] if t]
    return files


def check(model_id: str, hub_url: str, paths: LocalPaths) -> dict[str, Any] | None:
    """The model's config.json when readable (for the estimate), after refusing (422) a model
    the trainer cannot fine-tune."""
    files = read_files(model_id, hub_url, paths)
    if files is None:
        return None
    config = files.config
    kind = config.get("model_type", "?")
    if not config.get("vision_config"):
        _refuse(
            model_id,
            f"its config.json ({kind}) has no vision_config: it is not a vision-language model",
            "choose an image-text-to-text checkpoint",
        )
    if files.template is None:
        if kind not in PREFIX_LM_TYPES:
            _refuse(
                model_id,
                "it has no chat template, so the trainer cannot tell where its answer goes",
                "use the model's instruction-tuned (-it / -Instruct) variant",
            )
        return config
    try:
        prompt, full = _render(files, PROBE_LABELS[0])
    except Exception:  # a template only transformers' own renderer handles
        return config  # the trainer's preflight renders it the real way
    specials = files.specials + _TOKEN_SHAPE.findall(full[len(prompt) :])
    eos = _content(files.tokenizer.get("eos_token"))
    try:
        answer_format(prompt, full, PROBE_LABELS[0], specials, eos)
    except ChatFormatError as exc:
        _refuse(model_id, str(exc), "use the model's instruction-tuned variant")
    return config


def _render(files: ModelFiles, answer: str) -> tuple[str, str]:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    # transformers' settings (utils/chat_template_utils.py): trim_blocks, lstrip_blocks, the
    # loopcontrols extension and a raise_exception global. Its {% generation %} tags only mark
    # the assistant's text; dropped here.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda v, **kw: json.dumps(v, ensure_ascii=False)
    assert files.template is not None
    template = env.from_string(_GENERATION_TAGS.sub("", files.template))
    tokens = {
        k: _content(files.tokenizer.get(k)) or "" for k in ("bos_token", "eos_token", "pad_token")
    }
    labels = list(PROBE_LABELS)
    prompt = template.render(messages=messages(labels), add_generation_prompt=True, **tokens)
    full = template.render(messages=messages(labels, answer), add_generation_prompt=False, **tokens)
    return prompt, full


def _refuse(model_id: str, problem: str, fix: str) -> None:
    detail = f"{model_id}: {problem}. Fix: {fix}"
    raise Problem(
        422,
        "Model cannot be fine-tuned",
        detail,
        errors=[{"field": "body.spec.model_id", "message": detail}],
    )


def _template(texts: dict[str, str | None], tokenizer: dict[str, Any]) -> str | None:
    if texts.get("chat_template.jinja"):
        return texts["chat_template.jinja"]
    as_json = _json(texts.get("chat_template.json")) or {}
    found = as_json.get("chat_template") or tokenizer.get("chat_template")
    if isinstance(found, list):  # named templates: the default one
        found = next((t.get("template") for t in found if t.get("name") == "default"), None)
    return found if isinstance(found, str) and found else None


def _read_local(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _read_hub(model_id: str, hub_url: str) -> dict[str, str | None]:
    texts: dict[str, str | None] = {}
    try:
        with httpx.Client(timeout=TIMEOUT_SECONDS, follow_redirects=True) as client:
            for name in FILES:
                response = client.get(f"{hub_url}/{model_id}/resolve/main/{name}")
                texts[name] = response.text if response.status_code == 200 else None
                if name == "config.json" and texts[name] is None:
                    break  # not there, gated or private: nothing more to read
    except httpx.HTTPError:
        return {}
    return texts


def _json(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _content(token: Any) -> str | None:
    if isinstance(token, dict):  # {"content": "<eos>", ...} in older tokenizer configs
        token = token.get("content")
    return token if isinstance(token, str) else None
