"""Checks of what a request brings, for text no database stores and names that must follow a
pattern: 422 problems that name the field."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# `invalid` is imported from here by the runs' and events' queries.
from api.errors import invalid as invalid
from api.runs.models import TAG


def check_storable(value: Any, path: str) -> None:
    """Refuse text no database can store: NUL characters (PostgreSQL rejects them) and unpaired
    surrogates (not UTF-8). JSON allows both, so a request can carry them."""
    if isinstance(value, str):
        check_text(value, path)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(str(k), path)
            check_storable(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_storable(v, f"{path}.{i}")


def check_tags(tags: Iterable[str], field: str) -> None:
    bad = [t for t in tags if not TAG.match(t)]
    if bad:
        message = f"{bad[0]!r} is not a tag (letters, digits and _.:/=+-, at most 64)"
        raise invalid(field, message)


def check_text(value: str, path: str, max_length: int | None = None) -> None:
    """Refuse text no database can store (NUL, unpaired surrogates) or longer than allowed."""
    if max_length is not None and len(value) > max_length:
        raise invalid(path, f"at most {max_length} characters")
    if "\x00" in value:
        raise invalid(path, "contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(path, "contains an unpaired surrogate (not valid UTF-8)") from None
