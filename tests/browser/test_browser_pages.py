"""The dashboard's pages in headless Chromium: content, sorting, paging, charts, markup safety,
and the same pages with JavaScript off. These tests only read; test_browser_actions.py writes."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.conftest import DESKTOP, HANG_GUARD_MS, Site, Watch
from tests.browser.seed import XSS, XSS_LABEL

pytestmark = pytest.mark.browser

Shoot = Callable[[Page, str], None]


def test_runs_page_lists_every_state_and_filters(page: Page, site: Site, shoot: Shoot) -> None:
    page.goto("/")
    expect(page.locator("h1")).to_contain_text("Runs")
    rows = page.locator("table.runs tbody tr")
    expect(rows).to_have_count(9)
    for status in ("succeeded", "running", "failed", "cancelled", "queued"):
        # The status reads as a word (and an icon) as well as a colour.
        expect(page.locator(f"table.runs .badge-{status}").first).to_contain_text(status)
    improved = rows.filter(has_text="gemma-4b lr 3e-4")
    expect(improved).to_contain_text("google/gemma-3-4b-it")
    expect(improved).to_contain_text("1000 / 300")
    # Baseline → final with the change, for accuracy and macro F1.
    expect(improved.locator("td[data-label=Accuracy]")).to_contain_text("→")
    expect(improved.locator("td[data-label=Accuracy] .delta.up")).to_contain_text("pp")
    shoot(page, "runs")

    page.select_option("select[name=status]", "failed")
    page.click("form.filters button[type=submit]")
    expect(page).to_have_url(re.compile(r"status=failed"))
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("gemma-12b oom")

    page.goto("/")
    page.fill("input[name=q]", "sweep")
    page.press("input[name=q]", "Enter")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("abandoned sweep")

    page.goto("/")
    page.click("table.runs a.tag >> text=nightly")
    expect(page).to_have_url(re.compile(r"tag=nightly"))
    expect(rows).to_have_count(3)

    page.goto("/")
    page.click(".chips a.chip-running")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("gemma-4b long run")


def test_runs_page_pages_by_keyset(page: Page) -> None:
    page.goto("/?limit=4")
    rows = page.locator("table.runs tbody tr")
    expect(rows).to_have_count(4)
    first = rows.locator(".id").all_inner_texts()
    page.click("a[rel=next]")
    expect(rows).to_have_count(4)
    second = rows.locator(".id").all_inner_texts()
    page.click("a[rel=next]")
    expect(rows).to_have_count(1)
    third = rows.locator(".id").all_inner_texts()
    assert len(set(first + second + third)) == 9
    expect(page.locator("a[rel=next]")).to_have_count(0)
    page.click("a[rel=prev]")
    expect(rows).to_have_count(4)
    assert rows.locator(".id").all_inner_texts() == second


def test_runs_table_sorts_by_a_column_click(page: Page) -> None:
    page.goto("/?status=succeeded")
    page.click("table.runs th:has-text('Accuracy')")
    values = [
        float(v)
        for v in page.locator("table.runs td[data-label=Accuracy]").evaluate_all(
            "els => els.map(e => e.dataset.value)"
        )
    ]
    assert values == sorted(values) and len(values) == 5
    page.click("table.runs th:has-text('Accuracy')")
    values = [
        float(v)
        for v in page.locator("table.runs td[data-label=Accuracy]").evaluate_all(
            "els => els.map(e => e.dataset.value)"
        )
    ]
    assert values == sorted(values, reverse=True)


def test_history_shows_baseline_beside_final_and_links_each_point(
    page: Page, site: Site, shoot: Shoot
) -> None:
    page.goto("/history")
    group = (
        page.locator("section.group")
        .filter(has_text="oxford-iiit-pet")
        .filter(has_text="google/gemma-3-4b-it")
    )
    expect(group).to_have_count(1)
    expect(group).to_contain_text("3 finished runs")
    accuracy = group.locator("figure").filter(has_text="Accuracy").locator("svg")
    points = accuracy.locator("a.pt")
    expect(points).to_have_count(3)
    # Each point names its run and links to it; the baseline (hollow dot) sits beside the final.
    point = points.filter(has=page.locator("title", has_text="gemma-4b lr 3e-4"))
    expect(point).to_have_attribute("href", f"/runs/{site.fleet.improved}")
    expect(point.locator("title")).to_have_text(
        re.compile(r"accuracy 8\d\.\d% \(baseline 4\d\.\d%")
    )
    expect(point.locator("circle")).to_have_count(3)  # baseline, final, touch target
    expect(page.locator("section.group")).to_have_count(3)
    shoot(page, "history")
    point.click()
    expect(page).to_have_url(f"{site.url}/runs/{site.fleet.improved}")
    expect(page.locator("h1")).to_contain_text("gemma-4b lr 3e-4")


def test_run_page_of_a_succeeded_run(page: Page, site: Site, shoot: Shoot) -> None:
    page.goto(f"/runs/{site.fleet.regressed}")
    expect(page.locator("h1")).to_contain_text("gemma-4b r8")
    expect(page.locator("h1 .badge")).to_contain_text("succeeded")
    # Spec, execution handle, artifact and log.
    expect(page.locator(".kv.spec")).to_contain_text("lora_r")
    expect(page.locator(".run-side")).to_contain_text(f"local/{site.fleet.regressed}/1")
    # Loss curve and phases, server-rendered.
    expect(page.locator("svg.chart-loss path")).to_have_count(1)
    expect(page.locator("svg.chart-phases rect")).to_have_count(4)
    # Baseline vs final.
    expect(page.locator(".stat").first).to_contain_text("pp")
    # Per-class table: worst F1 first.
    f1 = page.locator("table.classes tbody td[data-label=F1]")
    values = [float(v) for v in f1.evaluate_all("els => els.map(e => e.dataset.value)")]
    assert values == sorted(values) and len(values) == 6
    page.click("table.classes th:has-text('Support')")
    page.click("table.classes thead th >> text=F1 >> nth=0")
    expect(page.locator("table.classes thead th[aria-sort]")).to_contain_text("F1")
    # Confusion heatmap: 6 classes x (6 + "no label") cells.
    expect(page.locator("svg.chart-confusion rect")).to_have_count(42)
    # Sample predictions, mistakes first, with the raw answer.
    first = page.locator("table.predictions tbody tr").first
    expect(first).to_contain_text("wrong")
    expect(page.locator("table.predictions")).to_contain_text("I cannot tell <b>which</b> breed.")
    # Timeline from the events.
    timeline = page.locator("ol.timeline")
    for word in ("created", "started", "baseline eval", "evaluation", "completed"):
        expect(timeline).to_contain_text(word)
    shoot(page, "run-succeeded")
    page.click("text=Open the log")
    expect(page.locator("body")).to_contain_text(f"trainer log of {site.fleet.regressed}")


def test_run_page_of_a_failed_run(page: Page, site: Site, shoot: Shoot) -> None:
    page.goto(f"/runs/{site.fleet.failed}")
    expect(page.locator("h1 .badge")).to_contain_text("failed")
    expect(page.locator(".reason")).to_contain_text("CUDA out of memory")
    expect(page.locator("ol.timeline .ev-failed")).to_contain_text("CUDA out of memory")
    page.click("ol.timeline summary")
    expect(page.locator("pre.log")).to_contain_text("RuntimeError")
    # A finished run offers Retrain but no Cancel.
    expect(page.locator("button", has_text="Cancel run")).to_have_count(0)
    expect(page.locator("button", has_text="Retrain")).to_have_count(1)
    shoot(page, "run-failed")


def test_queued_and_cancelled_run_pages(page: Page, site: Site, shoot: Shoot) -> None:
    page.goto(f"/runs/{site.fleet.queued}")
    expect(page.locator("h1 .badge")).to_contain_text("queued")
    expect(page.locator(".progress-card")).to_contain_text("Queued")
    expect(page.locator("button", has_text="Cancel run")).to_have_count(1)
    shoot(page, "run-queued")
    page.goto(f"/runs/{site.fleet.cancelled}")
    expect(page.locator("h1 .badge")).to_contain_text("cancelled")
    shoot(page, "run-cancelled")


def test_unknown_run_and_bad_query_get_pages_not_errors(page: Page) -> None:
    response = page.goto("/runs/run_doesnotexist")
    assert response is not None and response.status == 404
    expect(page.locator("h1")).to_have_text("Run not found")
    response = page.goto("/?status=bogus")
    assert response is not None and response.status == 400
    expect(page.locator("main")).to_contain_text("unknown status 'bogus'")


def test_markup_in_names_notes_tags_labels_and_answers_never_runs(
    page: Page, site: Site, shoot: Shoot
) -> None:
    xss = site.fleet.xss
    pages = [
        "/",
        "/?q=" + "%3Cscript%3Ewindow.__xss%3D1%3C%2Fscript%3E",
        "/history",
        f"/runs/{xss}",
        f"/runs/{site.fleet.cancelled}",
        f"/runs/new?from={xss}",
        f"/compare?ids={xss},{site.fleet.improved}",
    ]
    for path in pages:
        page.goto(path)
        assert page.evaluate("window.__xss") is None, path
        expect(page.locator("#xss-bold")).to_have_count(0)
        expect(page.locator("img[src=x]")).to_have_count(0)
        # Only our own script is on the page.
        assert page.locator("script").evaluate_all("els => els.map(e => e.src)") == [
            f"{site.url}/static/dashboard.js"
        ], path
    # The markup shows as text where it was written: name, notes, status reason, tag, label, answer.
    page.goto(f"/runs/{xss}")
    expect(page.locator("h1")).to_contain_text("<script>window.__xss='script'</script>")
    expect(page.locator(".notes")).to_have_text(XSS)
    expect(page.locator(".run-head .tag", has_text="onerror")).to_have_count(1)
    expect(page.locator("table.classes tbody th", has_text=XSS_LABEL)).to_have_count(1)
    expect(page.locator("svg.chart-confusion text", has_text="<img src=x")).to_have_count(2)
    # A `javascript:` log location is shown, never linked.
    expect(page.locator("a[href^=javascript]")).to_have_count(0)
    expect(page.locator(".run-side")).to_contain_text("javascript:window.__xss='log'")
    shoot(page, "run-markup")
    page.goto(f"/runs/new?from={xss}")
    expect(page.locator("#f-name")).to_have_value(XSS + " (retrain)")
    page.goto(f"/runs/{site.fleet.cancelled}")
    expect(page.locator(".reason")).to_have_text("superseded: " + XSS)


def test_pages_work_with_javascript_off(browser: Browser, site: Site, watch: Watch) -> None:
    context = browser.new_context(viewport=DESKTOP, base_url=site.url, java_script_enabled=False)
    context.set_default_timeout(HANG_GUARD_MS)
    page = context.new_page()
    watch.attach(page)
    page.goto("/")
    page.select_option("select[name=status]", "succeeded")
    page.click("form.filters button[type=submit]")
    expect(page.locator("table.runs tbody tr")).to_have_count(5)
    page.goto(f"/runs/{site.fleet.improved}")
    # Sorting falls back to links that the server sorts by.
    page.click("table.classes thead a:has-text('Class')")
    expect(page).to_have_url(re.compile(r"sort=label&dir=asc"))
    labels = page.locator("table.classes tbody th").all_inner_texts()
    assert labels == sorted(labels, key=str.lower)
    page.click("table.classes thead a:has-text('Class')")
    labels = page.locator("table.classes tbody th").all_inner_texts()
    assert labels == sorted(labels, key=str.lower, reverse=True)
    page.goto("/history")
    expect(page.locator("section.group")).to_have_count(3)
    context.close()
