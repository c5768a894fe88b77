"""Server-rendered SVG charts for the dashboard: loss curve, metric history, confusion heatmap.

Charts are drawn here rather than by a browser library so that a page needs no JavaScript and
makes no request beyond the server, and so that long series are cut down before they are sent.
Every piece of text that reaches the SVG (labels, run names, tooltips) goes through `escape`;
the result is `Markup`, so templates insert it as is without `|safe` on anything user-supplied.
The drawing primitives (frame, ticks, downsampling) are api/web/chart_svg.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from markupsafe import Markup, escape

from api.web.chart_svg import (
    AXIS,
    LINE,
    Frame,
    empty_chart,
    fmt_num,
    fmt_time,
    lttb,
    nice_ticks,
    open_svg,
    path_svg,
    x_labels,
    y_grid,
)
from api.wording import count

# ---- loss curve -----------------------------------------------------------------------------


def loss_chart(
    points: Sequence[tuple[int, float]],
    *,
    max_points: int = 400,
    total_steps: int | None = None,
    height: int = 220,
    empty: str = "No loss reported yet",
) -> Markup:
    """Training loss by step, downsampled to `max_points` with LTTB."""
    pts = [(float(s), float(v)) for s, v in points if v is not None and math.isfinite(v)]
    if not pts:
        return empty_chart(empty)
    pts.sort()
    shown = lttb(pts, max_points)
    f = Frame(height, x_lo_pct=4.5)
    x_lo = min(0.0, pts[0][0])
    x_hi = float(max(total_steps or 0, pts[-1][0], pts[0][0] + 1))
    y_ticks = nice_ticks(min(p[1] for p in pts), max(p[1] for p in pts), 5)
    y_lo, y_hi = y_ticks[0], y_ticks[-1]
    if y_hi == y_lo:
        y_hi = y_lo + 1

    def fx(v: float) -> float:
        return (v - x_lo) / (x_hi - x_lo)

    def fy(v: float) -> float:
        return (v - y_lo) / (y_hi - y_lo)

    last_step, last_loss = pts[-1]
    label = f"Training loss over {len(pts)} steps (last {last_loss:.4g} at step {int(last_step)})"
    parts = open_svg(f, label, "chart-loss")
    y_grid(parts, f, [(fy(t), fmt_num(t)) for t in y_ticks])
    x_ticks = [t for t in nice_ticks(x_lo, x_hi, 6) if x_lo < t <= x_hi]
    x_labels(parts, f, [(f.px(fx(t)), fmt_num(t)) for t in x_ticks])
    parts.append(
        path_svg(
            f,
            [(fx(x), f.py(fy(y))) for x, y in shown],
            f'stroke="{LINE}" stroke-width="2"',
        )
    )
    parts.append(
        f'<circle cx="{f.px(fx(last_step)):.2f}%" cy="{f.py(fy(last_loss)):.1f}" r="3.5" '
        f'fill="{LINE}"/>'
    )
    note = "step" if len(shown) == len(pts) else f"step · {len(shown)} of {len(pts)} points drawn"
    parts.append(
        f'<text x="100%" y="11" text-anchor="end" font-size="10" fill="{AXIS}">'
        f"{escape(note)}</text></svg>"
    )
    return Markup("".join(parts))


# ---- metric history -------------------------------------------------------------------------


@dataclass(frozen=True)
class HistoryPoint:
    run_id: str
    run_label: str
    at: datetime
    baseline: float | None
    final: float


def history_chart(
    points: Sequence[HistoryPoint],
    *,
    metric: str,
    href: str = "/runs/{id}",
    height: int = 220,
) -> Markup:
    """One metric of finished runs over time: each run's final value (filled dot, joined by a
    line) with its baseline beside it (hollow dot, joined to the final by a thin bar), so the
    gain of every run reads at a glance. Each run's marks are one link to its page."""
    # Drawn top to bottom like the heatmap (a few lines over ~60): axes, then both series.
    if not points:
        return empty_chart(f"No finished runs with {metric}")
    pts = sorted(points, key=lambda p: p.at)
    f = Frame(height, x_lo_pct=6, x_hi_pct=96)
    ts = [p.at.timestamp() for p in pts]
    t_lo, t_hi = ts[0], ts[-1]
    if t_hi - t_lo < 60:
        t_lo, t_hi = t_lo - 3600, t_hi + 3600
    values = [p.final for p in pts] + [p.baseline for p in pts if p.baseline is not None]
    lo = max(0.0, math.floor(min(values) * 10) / 10)
    hi = min(1.0, math.ceil(max(values) * 10) / 10)
    if hi - lo < 0.2:
        lo, hi = max(0.0, hi - 0.2), max(hi, 0.2)
    y_ticks = nice_ticks(lo, hi, 5)
    y_lo, y_hi = y_ticks[0], y_ticks[-1]

    def fx(t: float) -> float:
        return (t - t_lo) / (t_hi - t_lo)

    def fy(v: float) -> float:
        return (v - y_lo) / (y_hi - y_lo)

    label = f"{metric} of {count(len(pts), 'finished run')} over time, baseline beside final"
    parts = open_svg(f, label, "chart-history")
    y_grid(parts, f, [(fy(t), f"{t * 100:.0f}%") for t in y_ticks])
    span = t_hi - t_lo
    x_labels(parts, f, [(f.px(fx(t)), fmt_time(t, span)) for t in _time_ticks(t_lo, t_hi)])
    if len(pts) > 1:
        parts.append(
            path_svg(
                f,
                [(fx(t), f.py(fy(p.final))) for t, p in zip(ts, pts, strict=True)],
                f'stroke="{LINE}" stroke-width="1.5" opacity="0.45"',
            )
        )
    for t, p in zip(ts, pts, strict=True):
        x, fy_px = f"{f.px(fx(t)):.2f}%", f.py(fy(p.final))
        tip = f"{p.run_label} — {metric} {p.final * 100:.1f}%"
        if p.baseline is not None:
            tip += f" (baseline {p.baseline * 100:.1f}%, {(p.final - p.baseline) * 100:+.1f} pp)"
        tip += f" — {p.at:%Y-%m-%d %H:%M}"
        # The <title> is both the tooltip and the link's accessible name.
        parts.append(
            f'<a href="{escape(href.format(id=p.run_id))}" class="pt"><title>{escape(tip)}</title>'
        )
        # Styled by class (dashboard.css): hundreds of points per page, so every byte counts.
        if p.baseline is not None:
            by = f.py(fy(p.baseline))
            parts.append(
                f'<line class="gain" x1="{x}" x2="{x}" y1="{by:.1f}" y2="{fy_px:.1f}"/>'
                f'<circle class="base" cx="{x}" cy="{by:.1f}" r="3.5"/>'
            )
        parts.append(f'<circle class="final" cx="{x}" cy="{fy_px:.1f}" r="4.5"/>')
        # A wider transparent target: small dots are hard to hit with a finger.
        parts.append(f'<circle class="hit" cx="{x}" cy="{fy_px:.1f}" r="11"/></a>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _time_ticks(lo: float, hi: float, count: int = 3) -> list[float]:
    # Three labels: a date and time label is ~75 px wide and a phone gives the chart ~300 px.
    step = (hi - lo) / count
    return [lo + step * (i + 0.5) for i in range(count)]


# ---- confusion matrix -----------------------------------------------------------------------


def confusion_heatmap(
    labels: Sequence[str], matrix: Sequence[Sequence[int]], *, max_classes: int = 40
) -> Markup:
    """Rows: true class; columns: predicted class, plus "none" when the answer named no label.
    Each cell's shade is its share of the row (so rare classes read as clearly as common ones):
    the diagonal in the "correct" hue, everything else in the "error" hue. With many classes only
    the `max_classes` most confused are drawn; the caption says so."""
    # One SVG drawn top to bottom (~80 lines): its parts share the cell geometry computed first,
    # and split into functions they would pass a dozen values around.
    n = len(labels)
    if n == 0 or not matrix:
        return empty_chart("No confusion matrix")
    rows = [list(r) + [0] * (n + 1 - len(r)) for r in matrix[:n]]
    rows += [[0] * (n + 1) for _ in range(n - len(rows))]
    keep = list(range(n))
    if n > max_classes:
        errors = [
            sum(rows[i]) - rows[i][i] + sum(rows[j][i] for j in range(n) if j != i)
            for i in range(n)
        ]
        keep = sorted(sorted(range(n), key=lambda i: -errors[i])[:max_classes])
    has_none = any(r[n] for r in rows)
    cols = [*keep, n] if has_none else keep
    k = len(keep)
    cell = max(12, min(40, 560 // max(len(cols), 1)))
    longest = max(len(labels[i]) for i in keep)
    margin = min(150, 16 + 6.5 * min(longest, 22))
    top = margin
    width = int(margin + cell * len(cols) + 10)
    height = int(top + cell * k + 24)
    show_numbers = cell >= 20
    caption = f"Confusion matrix of {n} classes (rows: true, columns: predicted)"
    if k < n:
        caption += f"; the {k} most confused shown"
    parts = [
        f'<svg class="chart chart-confusion" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(caption)}" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}">',
        f"<title>{escape(caption)}</title>",
    ]

    def short(text: str) -> str:
        return text if len(text) <= 22 else text[:21] + "…"

    for ci, j in enumerate(cols):
        name = labels[j] if j < n else "(no label)"
        cx = margin + ci * cell + cell / 2
        parts.append(
            f'<text transform="translate({cx + 4:.1f},{top - 6}) rotate(-60)" font-size="11" '
            f'fill="{AXIS}"><title>{escape(name)}</title>{escape(short(name))}</text>'
        )
    for ri, i in enumerate(keep):
        total = sum(rows[i]) or 1
        y0 = top + ri * cell
        parts.append(
            f'<text x="{margin - 6}" y="{y0 + cell / 2 + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="{AXIS}"><title>{escape(labels[i])}</title>{escape(short(labels[i]))}</text>'
        )
        for ci, j in enumerate(cols):
            count = rows[i][j]
            share = count / total
            hue = "var(--hm-ok, 22,163,74)" if i == j else "var(--hm-bad, 220,38,38)"
            fill = f"rgba({hue},{0.08 + 0.92 * share:.3f})" if count else "var(--hm-zero, #f3f4f6)"
            pred = labels[j] if j < n else "(no label)"
            tip = f"true {labels[i]} → predicted {pred}: {count} ({share * 100:.0f}% of the row)"
            parts.append(
                f'<rect x="{margin + ci * cell:.1f}" y="{y0:.1f}" width="{cell - 1}" '
                f'height="{cell - 1}" fill="{fill}"><title>{escape(tip)}</title></rect>'
            )
            if show_numbers and count:
                ink = "#fff" if share > 0.55 else "var(--fg, #111827)"
                parts.append(
                    f'<text x="{margin + ci * cell + (cell - 1) / 2:.1f}" '
                    f'y="{y0 + cell / 2 + 4:.1f}" text-anchor="middle" font-size="10" '
                    f'fill="{ink}" pointer-events="none">{count}</text>'
                )
    parts.append(
        f'<text x="{margin}" y="{height - 6}" font-size="11" fill="{AXIS}">'
        f"rows: true class · columns: predicted · shade: share of the row</text></svg>"
    )
    return Markup("".join(parts))


# ---- phase strip ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    name: str
    start: datetime
    end: datetime


def phase_strip(spans: Sequence[Span], *, height: int = 30) -> Markup:
    """The run's phases as one horizontal bar, each phase as wide as it lasted."""
    if not spans:
        return Markup("")
    t0 = spans[0].start.timestamp()
    t1 = max(s.end.timestamp() for s in spans)
    total = max(t1 - t0, 1e-6)
    parts = [
        f'<svg class="chart chart-phases" width="100%" height="{height}" role="img" '
        f'aria-label="phases of the run" xmlns="http://www.w3.org/2000/svg">'
    ]
    for i, s in enumerate(spans):
        secs = s.end.timestamp() - s.start.timestamp()
        x0 = (s.start.timestamp() - t0) / total * 100
        w = max(secs / total * 100, 0.4)
        tip = f"{s.name.replace('_', ' ')}: {_fmt_secs(secs)}"
        parts.append(
            f'<g><title>{escape(tip)}</title><rect x="{x0:.2f}%" y="1" width="{w:.2f}%" '
            f'height="{height - 2}" rx="3" class="phase phase-{i % 6}"/>'
        )
        if w > 14:
            parts.append(
                f'<text x="{x0 + 0.8:.2f}%" y="{height / 2 + 4}" font-size="11" '
                f'class="phase-text">{escape(tip)}</text>'
            )
        parts.append("</g>")
    parts.append("</svg>")
    return Markup("".join(parts))


def _fmt_secs(secs: float) -> str:
    secs = max(0, round(secs))
    if secs < 60:
        return f"{secs}s"
    if secs < 3600:
        return f"{secs // 60}m {secs % 60:02d}s"
    return f"{secs // 3600}h {secs % 3600 // 60:02d}m"
