"""Counts that agree with their noun, for every page and chart label: "1 finished run"."""

from __future__ import annotations


def count(n: int, one: str, many: str | None = None) -> str:
    """`n` with the noun that agrees with it: "1 finished run", "2 finished runs", "0 classes"
    (`{{ n | count("finished run") }}` in a template; `many` for plurals that are not noun + s).
    """
    return f"{n} {one if n == 1 else many or one + 's'}"
