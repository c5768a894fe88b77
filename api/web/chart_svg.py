"""The pieces every dashboard chart is drawn with: colours, downsampling (LTTB), axis ticks and
labels, the frame that maps data to positions, and an empty chart. api/web/charts.py draws
the charts themselves. Text that reaches the SVG goes through `escape`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from markupsafe import Markup, escape

# Colours come from CSS custom properties where possible (light and dark themes); the fallbacks
# keep a chart readable when it is opened on its own.
AXIS = "var(--chart-axis, #6b7280)"
GRID = "var(--chart-grid, #e5e7eb)"
LINE = "var(--chart-line, #2563eb)"
BASE = "var(--chart-baseline, #9ca3af)"


# ---- downsampling ---------------------------------------------------------------------------


def lttb(points: Sequence[tuple[float, float]], threshold: int) -> list[tuple[float, float]]:
    """Largest-Triangle-Three-Buckets: keep `threshold` points that preserve the curve's shape
    (peaks and dips survive, unlike plain striding). Points must be sorted by x."""
    n = len(points)
    if threshold >= n or threshold < 3:
        return list(points)
    out = [points[0]]
    every = (n - 2) / (threshold - 2)
    a = 0
    for i in range(threshold - 2):
        # The next bucket's average is the third corner of the triangle.
        nxt_start = math.floor((i + 1) * every) + 1
        nxt_end = min(math.floor((i + 2) * every) + 1, n)
        span = points[nxt_start:nxt_end] or [points[-1]]
        avg_x = sum(p[0] for p in span) / len(span)
        avg_y = sum(p[1] for p in span) / len(span)
        start = math.floor(i * every) + 1
        end = math.floor((i + 1) * every) + 1
        ax, ay = points[a]
        best, best_area = start, -1.0
        for j in range(start, end):
            bx, by = points[j]
            area = abs((ax - avg_x) * (by - ay) - (ax - bx) * (avg_y - ay))
            if area > best_area:
                best, best_area = j, area
        out.append(points[best])
        a = best
    out.append(points[-1])
    return out


# ---- axes -----------------------------------------------------------------------------------


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k) covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


def fmt_num(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v / 1000:g}k"
    if abs(v) < 0.01:
        return f"{v:.0e}"
    return f"{v:g}"


def fmt_time(t: float, span_seconds: float) -> str:
    d = datetime.fromtimestamp(t, UTC)
    if span_seconds < 2 * 86400:
        return d.strftime("%b %d %H:%M")
    if span_seconds < 300 * 86400:
        return d.strftime("%b %d")
    return d.strftime("%Y-%m")


@dataclass(frozen=True)
class Frame:
    """A chart as wide as its container and `height` pixels tall. Horizontal positions are
    percentages of the width, so text keeps its size on a phone instead of shrinking with a
    scaled viewBox; y-axis labels sit on their grid lines inside the plot, which needs no fixed
    gutter. Series paths go in a nested SVG stretched to the width (`path_svg`)."""

    height: int
    top: int = 16
    bottom: int = 26
    x_lo_pct: float = 1.5
    x_hi_pct: float = 98.5

    @property
    def base(self) -> int:
        return self.height - self.bottom

    def px(self, frac: float) -> float:
        """Percent of the width for `frac` in [0, 1] of the x range."""
        return self.x_lo_pct + frac * (self.x_hi_pct - self.x_lo_pct)

    def py(self, frac: float) -> float:
        """Pixels from the top for `frac` in [0, 1] of the y range (1 = top)."""
        return self.top + (1 - frac) * (self.base - self.top)


def open_svg(frame: Frame, label: str, css_class: str) -> list[str]:
    return [
        f'<svg class="chart {css_class}" width="100%" height="{frame.height}" role="img" '
        f'aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(label)}</title>",
    ]


def y_grid(parts: list[str], f: Frame, ticks: list[tuple[float, str]]) -> None:
    """Grid lines at `(fraction of the y range, label)`, each label just above its line."""
    for frac, text in ticks:
        y = f.py(frac)
        parts.append(
            f'<line x1="0" x2="100%" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}" stroke-width="1"/>'
            f'<text x="0" y="{y - 4:.1f}" font-size="11" fill="{AXIS}">{escape(text)}</text>'
        )


def x_labels(parts: list[str], f: Frame, ticks: list[tuple[float, str]]) -> None:
    """The x axis with labels at `(percent of the width, label)`."""
    parts.append(
        f'<line x1="0" x2="100%" y1="{f.base}" y2="{f.base}" stroke="{AXIS}" stroke-width="1"/>'
    )
    for pct, text in ticks:
        anchor = "start" if pct < 8 else "end" if pct > 92 else "middle"
        parts.append(
            f'<text x="{pct:.2f}%" y="{f.base + 17}" text-anchor="{anchor}" font-size="11" '
            f'fill="{AXIS}">{escape(text)}</text>'
        )


def path_svg(f: Frame, points: Sequence[tuple[float, float]], attrs: str) -> str:
    """A polyline through `(x fraction, y pixels)` points, in an SVG stretched to the chart's
    width; the stroke does not stretch with it."""
    d = " ".join(
        f"{'M' if i == 0 else 'L'}{f.px(x) * 10:.1f},{y:.1f}" for i, (x, y) in enumerate(points)
    )
    return (
        f'<svg x="0" y="0" width="100%" height="{f.height}" viewBox="0 0 1000 {f.height}" '
        f'preserveAspectRatio="none" overflow="visible"><path d="{d}" fill="none" {attrs} '
        f'vector-effect="non-scaling-stroke" stroke-linejoin="round" stroke-linecap="round"/>'
        f"</svg>"
    )


def empty_chart(message: str, height: int = 90) -> Markup:
    return Markup(
        f'<svg class="chart chart-empty" width="100%" height="{height}" role="img" '
        f'aria-label="{escape(message)}" xmlns="http://www.w3.org/2000/svg">'
        f'<text x="50%" y="{height / 2 + 5}" text-anchor="middle" font-size="14" '
        f'fill="{AXIS}">{escape(message)}</text></svg>'
    )
