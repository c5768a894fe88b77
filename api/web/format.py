"""How values read on the dashboard's pages: the Jinja filters and the status icons."""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from api.db import utcnow
from api.runs.models import Run
from api.runs.states import duration_seconds
from api.wording import count, secs

STATUS_ICONS = {
    "queued": "◷",
    "dispatched": "↗",
    "running": "▶",
    "cancelling": "◌",
    "succeeded": "✓",
    "failed": "✕",
    "cancelled": "⊘",
}


def pct(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v * 100:.{digits}f}%"


def pp(base: float | None, final: float | None) -> str:
    if base is None or final is None:
        return ""
    return f"{(final - base) * 100:+.1f} pp"


def change_class(base: float | None, final: float | None) -> str:
    if base is None or final is None:
        return ""
    d = final - base
    return "up" if d > 0.0005 else "down" if d < -0.0005 else "flat"


def ago(when: datetime | None) -> str:
    if when is None:
        return "—"
    s = (utcnow() - when).total_seconds()
    if s < 45:
        return "just now"
    if s < 3600:
        return f"{round(s / 60)} min ago"
    if s < 86400:
        return f"{round(s / 3600)} h ago"
    if s < 86400 * 60:
        return f"{round(s / 86400)} d ago"
    return when.strftime("%Y-%m-%d")


def when(at: datetime | None) -> str:
    return "—" if at is None else at.strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(run: Run) -> str:
    seconds = duration_seconds(run, utcnow())
    return "—" if seconds is None else secs(seconds)


def duration_value(run: Run) -> float:
    """The duration as a sort key (-1: not started)."""
    seconds = duration_seconds(run, utcnow())
    return -1 if seconds is None else round(seconds, 3)


def num(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "—" if v is None else ("yes" if v else "no")
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(str(x) for x in v)
    return str(v)


def qs(args: Mapping[str, Any], **changes: Any) -> str:
    """The query string of a link: the page's arguments with `changes`, empty ones left out."""
    merged = {k: v for k, v in {**args, **changes}.items() if v not in (None, "")}
    return "?" + urllib.parse.urlencode(merged) if merged else ""


FILTERS = {
    "pct": pct,
    "pp": pp,
    "change": change_class,
    "ago": ago,
    "when": when,
    "secs": secs,
    "duration": duration,
    "duration_value": duration_value,
    "num": num,
    "count": count,
}
