"""Numbers in words, the same on every page, chart label and command-line client: counts that
agree with their noun ("1 finished run") and durations ("1m 05s"). Imports nothing of the
server, so the HTTP clients (api/cli/runs.py) use it too."""

from __future__ import annotations

import math


def count(n: int, one: str, many: str | None = None) -> str:
    """`n` with the noun that agrees with it: "1 finished run", "2 finished runs", "0 classes"
    (`{{ n | count("finished run") }}` in a template; `many` for plurals that are not noun + s).
    """
    return f"{n} {one if n == 1 else many or one + 's'}"


def secs(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"
