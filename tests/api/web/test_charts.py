"""The dashboard's SVG charts and CSRF tokens, as units: downsampling, axes, escaping."""

from __future__ import annotations

import itertools
import math
import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from starlette.requests import Request

from api.auth import csrf
from api.config import Settings
from api.web import chart_svg, charts

PAYLOAD = "<script>alert(1)</script>\"'><img src=x onerror=alert(2)>"
SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    # Well-formed XML is itself a check on escaping: a stray `<` or `"` would not parse.
    return ET.fromstring(svg)


def test_lttb_keeps_the_ends_the_count_and_the_peaks() -> None:
    points = [(float(i), math.sin(i / 50)) for i in range(5_000)]
    points[2_345] = (2_345.0, 9.0)  # a spike that striding would likely drop
    out = chart_svg.lttb(points, 300)
    assert len(out) == 300
    assert out[0] == points[0] and out[-1] == points[-1]
    assert (2_345.0, 9.0) in out
    assert [x for x, _ in out] == sorted(x for x, _ in out)
    assert chart_svg.lttb(points[:10], 300) == points[:10]
    assert chart_svg.lttb(points[:10], 2) == points[:10]  # too few buckets to choose: unchanged


@pytest.mark.parametrize(
    ("lo", "hi"), [(0.0, 1.0), (0.31, 2.74), (1e-5, 3e-5), (5.0, 5.0), (0, 20_000)]
)
def test_nice_ticks_cover_the_range_in_round_steps(lo: float, hi: float) -> None:
    ticks = chart_svg.nice_ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi
    steps = {round(b - a, 12) for a, b in itertools.pairwise(ticks)}
    assert len(steps) == 1
    step = steps.pop()
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5))
    assert 2 <= len(ticks) <= 8


def test_loss_chart_draws_a_downsampled_path_and_says_so() -> None:
    svg = str(
        charts.loss_chart(
            [(s, 3 / (1 + s)) for s in range(1, 2_001)], max_points=250, total_steps=2_000
        )
    )
    root = parse(svg)
    paths = root.findall(f".//{SVG}path")
    assert len(paths) == 1
    assert len(re.findall(r"[ML]", paths[0].get("d", ""))) == 250
    assert "250 of 2000 points drawn" in svg
    assert root.get("aria-label", "").startswith("Training loss over 2000 steps")
    empty = str(charts.loss_chart([]))
    assert "No loss reported yet" in empty
    # Non-finite losses (a diverged step) are left out rather than breaking the scale.
    svg = str(charts.loss_chart([(1, 2.0), (2, float("nan")), (3, float("inf")), (4, 1.0)]))
    assert "nan" not in svg and "inf" not in svg


def test_history_chart_links_every_run_and_escapes_its_name() -> None:
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    points = [
        charts.HistoryPoint("run_a", PAYLOAD, t0, 0.4, 0.8),
        charts.HistoryPoint("run_b", "second", t0 + timedelta(days=3), None, 0.85),
    ]
    svg = str(charts.history_chart(points, metric="accuracy"))
    root = parse(svg)
    links = root.findall(f"{SVG}a")
    assert [a.get("href") for a in links] == ["/runs/run_a", "/runs/run_b"]
    assert "<script>" not in svg and "<img" not in svg
    title = links[0].find(f"{SVG}title")
    assert title is not None and title.text is not None and title.text.startswith(PAYLOAD)
    assert "(baseline 40.0%, +40.0 pp)" in (title.text or "")
    # A run without a baseline has no hollow dot: final dot and touch target only.
    assert len(links[0].findall(f"{SVG}circle")) == 3
    assert len(links[1].findall(f"{SVG}circle")) == 2
    assert "No finished runs" in str(charts.history_chart([], metric="accuracy"))


def test_confusion_heatmap_escapes_labels_and_caps_the_classes() -> None:
    labels = [PAYLOAD, "b", "c"]
    matrix = [[5, 1, 0, 0], [0, 6, 0, 0], [2, 0, 3, 1]]
    svg = str(charts.confusion_heatmap(labels, matrix))
    root = parse(svg)
    assert len(root.findall(f".//{SVG}rect")) == 3 * 4  # with the "no label" column
    assert "<script>" not in svg
    texts = "".join(root.itertext())
    assert PAYLOAD[:21] in texts  # labels are shortened on the axis, whole in the tooltip
    # Rows without the trailing "no label" column, and no unlabelled answers: no such column.
    svg = str(charts.confusion_heatmap(["x", "y"], [[1, 0], [0, 1]]))
    assert len(parse(svg).findall(f".//{SVG}rect")) == 4
    many = [f"class {i}" for i in range(60)]
    big = [[10 if i == j else 0 for j in range(61)] for i in range(60)]
    big[7][8] = 5
    svg = str(charts.confusion_heatmap(many, big, max_classes=40))
    assert "the 40 most confused shown" in svg
    assert len(parse(svg).findall(f".//{SVG}rect")) == 40 * 40
    assert ">class 7<" in svg and ">class 8<" in svg


def test_phase_strip_widths_follow_durations() -> None:
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    spans = [
        charts.Span("loading", t0, t0 + timedelta(seconds=10)),
        charts.Span(PAYLOAD, t0 + timedelta(seconds=10), t0 + timedelta(seconds=40)),
    ]
    root = parse(str(charts.phase_strip(spans)))
    widths = [float(r.get("width", "0").rstrip("%")) for r in root.iter(f"{SVG}rect")]
    assert widths == pytest.approx([25.0, 75.0])
    assert str(charts.phase_strip([])) == ""


def _request(cookies: dict[str, str] | None = None) -> Request:
    header = "; ".join(f"{k}={v}" for k, v in (cookies or {}).items())
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [(b"cookie", header.encode())] if header else [],
        "query_string": b"",
    }
    return Request(scope)


def test_csrf_tokens_bind_to_the_browser_nonce_and_the_key(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, run_worker=False)
    fresh = _request()
    token = csrf.token(fresh, settings)
    assert csrf.token(fresh, settings) == token  # one nonce per request
    nonce = fresh.state.csrf_new_nonce
    browser = _request({csrf.COOKIE: nonce})
    csrf.verify(browser, settings, token)
    for bad in (None, "", token[:-1] + ("0" if token[-1] != "0" else "1"), token.upper()):
        with pytest.raises(csrf.CsrfError):
            csrf.verify(browser, settings, bad)
    with pytest.raises(csrf.CsrfError, match="no form token cookie"):
        csrf.verify(_request(), settings, token)
    with pytest.raises(csrf.CsrfError):
        csrf.verify(_request({csrf.COOKIE: "x" * 43}), settings, token)
    other = Settings(data_dir=tmp_path / "other", run_worker=False)
    with pytest.raises(csrf.CsrfError):
        csrf.verify(browser, other, token)
