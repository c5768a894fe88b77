"""What people do on the dashboard, in headless Chromium: submit the new-run form (invalid, then
valid), cancel and retrain runs, compare runs, watch a running run update itself, and have a
forged form refused. Runs that a test changes are its own."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from playwright.sync_api import Browser, Page, expect
from sqlmodel import Session, select

from api.runs import query as q
from api.runs.models import Run, RunTag
from tests.browser.conftest import DESKTOP, HANG_GUARD_MS, Site, Watch

pytestmark = pytest.mark.browser

Shoot = Callable[[Page, str], None]


def test_new_run_form_shows_errors_by_their_fields_then_creates_the_run(
    page: Page, site: Site, shoot: Shoot
) -> None:
    page.goto("/runs/new")
    # Defaults come from the run spec itself.
    expect(page.locator("#f-train_size")).to_have_value("1000")
    expect(page.locator("#f-lora_r")).to_have_value("16")
    expect(page.locator("#f-gradient_checkpointing")).to_be_checked()
    expect(page.locator("#f-gpu_type")).to_have_value("nvidia-l4")
    shoot(page, "new-run")

    page.goto("/runs/new")
    page.fill("#f-name", "form run")
    page.fill("#f-dataset", "not-a-dataset")
    page.fill("#f-train_size", "0")
    page.fill("#f-learning_rate", "fast")
    page.click("button:has-text('Create run')")
    expect(page.locator("#err-model_id")).to_contain_text("is required")
    expect(page.locator("#err-dataset")).to_contain_text("unknown data set 'not-a-dataset'")
    expect(page.locator("#err-train_size")).to_contain_text("between 1 and 1000000")
    expect(page.locator("#err-learning_rate")).to_contain_text("valid number")
    # The error sits in the field's own block, and the input says so to assistive tech.
    expect(page.locator(".field.has-error #f-train_size")).to_have_attribute("aria-invalid", "true")
    # What was typed is kept.
    expect(page.locator("#f-name")).to_have_value("form run")
    expect(page.locator("#f-train_size")).to_have_value("0")
    shoot(page, "new-run-errors")

    page.fill("#f-model_id", "google/gemma-3-4b-it")
    page.fill("#f-dataset", "digits")
    page.fill("#f-train_size", "200")
    page.fill("#f-learning_rate", "0.0003")
    page.fill("#f-batch_size", "4")
    page.fill("#f-gradient_accumulation_steps", "4")
    page.fill("#f-tags", "form, smoke")
    page.fill("#f-notes", "made in the browser")
    page.uncheck("#f-gradient_checkpointing")
    page.click("button:has-text('Create run')")
    expect(page).to_have_url(re.compile(r"/runs/run_[0-9a-f]+\?notice=created$"))
    expect(page.locator(".notice")).to_contain_text("Run created")
    expect(page.locator("h1")).to_contain_text("form run")
    expect(page.locator("h1 .badge")).to_contain_text("queued")
    run_id = page.url.split("/runs/")[1].split("?")[0]
    with Session(site.engine) as session:
        run = session.get(Run, run_id)
        assert run is not None and run.name == "form run" and run.notes == "made in the browser"
        assert run.spec["train_size"] == 200 and run.spec["learning_rate"] == 3e-4
        assert run.spec["gradient_checkpointing"] is False
        assert sorted(q.tags_of(session, [run_id])[run_id]) == ["form", "smoke"]


def test_a_spec_that_cannot_fit_its_gpu_is_refused_next_to_the_gpu(page: Page) -> None:
    page.goto("/runs/new")
    page.fill("#f-model_id", "google/gemma-3-27b-it")
    page.fill("#f-dataset", "oxford-iiit-pet")
    page.select_option("#f-gpu_type", "nvidia-l4")
    page.click("button:has-text('Create run')")
    expect(page.locator("#err-gpu_type")).to_contain_text("GiB")
    expect(page.locator(".page-error").first).to_contain_text("does not fit")


def test_cancel_a_running_and_a_queued_run(page: Page, site: Site, shoot: Shoot) -> None:
    running = site.seeder.running_run("to be cancelled", steps_done=3)
    page.goto(f"/runs/{running}")
    expect(page.locator("h1 .badge")).to_contain_text("running")
    page.click("button:has-text('Cancel run')")
    expect(page).to_have_url(f"{site.url}/runs/{running}?notice=cancel-requested")
    expect(page.locator("h1 .badge")).to_contain_text("cancelling")
    expect(page.locator(".reason")).to_contain_text("cancelled from the dashboard")
    # A cancel already in flight offers no second one.
    expect(page.locator("button:has-text('Cancel run')")).to_have_count(0)

    queued = site.seeder.create("queued, then cancelled")
    page.goto(f"/runs/{queued}")
    page.click("button:has-text('Cancel run')")
    expect(page.locator("h1 .badge")).to_contain_text("cancelled")
    expect(page.locator("button:has-text('Retrain')")).to_have_count(1)
    shoot(page, "run-after-cancel")


def test_retrain_makes_a_linked_run(page: Page, site: Site) -> None:
    page.goto(f"/runs/{site.fleet.improved}")
    page.click("button:has-text('Retrain')")
    expect(page).to_have_url(re.compile(r"/runs/run_[0-9a-f]+\?notice=retrained$"))
    expect(page.locator("h1 .badge")).to_contain_text("queued")
    expect(page.locator("h1")).to_contain_text("gemma-4b lr 3e-4")
    lineage = page.locator("section", has_text="Lineage")
    expect(lineage).to_contain_text("Retrain of")
    lineage.locator("a", has_text="compare").click()
    expect(page.locator("h1")).to_have_text("Compare runs")
    expect(page.locator("section", has_text="Spec differences")).to_contain_text(
        "The specs are the same."
    )


def test_compare_two_runs_picked_on_the_runs_page(page: Page, site: Site, shoot: Shoot) -> None:
    page.goto("/?status=succeeded&tag=pets")
    page.check(f"input[name=ids][value={site.fleet.improved}]")
    page.check(f"input[name=ids][value={site.fleet.regressed}]")
    page.click("button:has-text('Compare selected')")
    expect(page).to_have_url(re.compile(r"/compare\?ids="))
    expect(page.locator("h1")).to_have_text("Compare runs")
    metrics = page.locator("section", has_text="Metrics")
    expect(metrics).to_contain_text("gemma-4b lr 3e-4")
    expect(metrics).to_contain_text("gemma-4b r8")
    diffs = page.locator("section", has_text="Spec differences").locator("table").first
    expect(diffs.locator("tbody tr")).to_have_count(2)  # learning_rate and lora_r
    expect(diffs).to_contain_text("learning_rate")
    expect(diffs).to_contain_text("lora_r")
    per_class = page.locator("section", has_text="Per-class F1").locator("table")
    expect(per_class.locator("tbody tr")).to_have_count(6)
    shoot(page, "compare")
    # Against the better run as the reference, the biggest drop comes first.
    page.goto(f"/compare?ids={site.fleet.improved},{site.fleet.regressed}")
    changes = per_class.locator("tbody td:nth-child(4)").evaluate_all(
        "els => els.map(e => +e.dataset.value)"
    )
    assert changes == sorted(changes) and changes[0] < 0


def test_a_running_run_updates_without_a_reload(page: Page, site: Site, shoot: Shoot) -> None:
    run_id = site.seeder.running_run("live run", steps_done=5, total=30)
    page.goto(f"/runs/{run_id}")
    expect(page.locator(".progress-text")).to_contain_text("step 5 of 30")
    page.evaluate("window.__sameDocument = true")
    site.seeder.progress(run_id, range(6, 19), 30)
    expect(page.locator(".progress-text")).to_contain_text("step 18 of 30")
    expect(page.locator("[data-live-indicator]")).to_contain_text("Live")
    shoot(page, "run-running")
    site.seeder.progress(run_id, range(19, 31), 30)
    site.seeder.phase(run_id, "final_eval")
    site.seeder.evaluate(run_id, "final", [0.9, 0.8, 1.0, 0.7])
    site.seeder.completed(run_id, 30)
    expect(page.locator("h1 .badge")).to_contain_text("succeeded")
    expect(page.locator(".stat-value").first).to_have_text(re.compile(r"\d+\.\d%"))
    expect(page.locator("ol.timeline")).to_contain_text("completed")
    expect(page.locator("button:has-text('Cancel run')")).to_have_count(0)
    assert page.evaluate("window.__sameDocument") is True  # updated in place, never reloaded
    # Finished: the page stops polling.
    expect(page.locator("main")).not_to_have_attribute("data-live-active", "1")


def test_forged_form_posts_are_refused(page: Page, site: Site) -> None:
    victim = site.seeder.create("must survive forgery")
    # Another site's page posting the cancel form: no token (and no cookie, as SameSite=Lax).
    page.set_content(
        f'<form method="post" action="{site.url}/runs/{victim}/cancel">'
        '<button id="go">go</button></form>'
    )
    page.click("#go")
    expect(page.locator("h1")).to_have_text("Form expired or forged")
    # Same origin with the cookie but a made-up token.
    page.goto(f"/runs/{victim}")
    response = page.request.post(
        f"/runs/{victim}/cancel", form={"csrf_token": "0" * 64, "form_key": "k" * 20}
    )
    assert response.status == 403
    assert "does not match" in response.text()
    with Session(site.engine) as session:
        run = session.get(Run, victim)
        assert run is not None and run.status == "queued"


def test_a_double_submitted_form_makes_one_run(page: Page, site: Site) -> None:
    page.goto(f"/runs/{site.fleet.regressed}")
    form = page.locator("form[action$=retrain]")
    token = form.locator("input[name=csrf_token]").input_value()
    key = form.locator("input[name=form_key]").input_value()
    first = page.request.post(
        f"/runs/{site.fleet.regressed}/retrain",
        form={"csrf_token": token, "form_key": key},
        max_redirects=0,
    )
    second = page.request.post(
        f"/runs/{site.fleet.regressed}/retrain",
        form={"csrf_token": token, "form_key": key},
        max_redirects=0,
    )
    assert first.status == second.status == 303
    assert first.headers["location"].split("?")[0] == second.headers["location"].split("?")[0]
    with Session(site.engine) as session:
        children = session.exec(select(Run).where(Run.parent_id == site.fleet.regressed)).all()
        assert len(children) == 1
        tags = session.exec(select(RunTag.tag).where(RunTag.run_id == children[0].id)).all()
        assert set(tags) == {"pets", "nightly"}


def test_forms_work_with_javascript_off(browser: Browser, site: Site, watch: Watch) -> None:
    context = browser.new_context(viewport=DESKTOP, base_url=site.url, java_script_enabled=False)
    context.set_default_timeout(HANG_GUARD_MS)
    page = context.new_page()
    watch.attach(page)
    page.goto("/runs/new")
    page.fill("#f-name", "no-js run")
    page.fill("#f-model_id", "google/gemma-3-4b-it")
    page.fill("#f-dataset", "digits")
    page.fill("#f-batch_size", "4")
    page.fill("#f-gradient_accumulation_steps", "4")
    page.click("button:has-text('Create run')")
    expect(page.locator("h1")).to_contain_text("no-js run")
    expect(page.locator("h1 .badge")).to_contain_text("queued")
    page.click("button:has-text('Cancel run')")
    expect(page.locator("h1 .badge")).to_contain_text("cancelled")
    context.close()


def test_promote_to_champion_with_the_gate_reasons_in_view(
    page: Page, site: Site, shoot: Shoot
) -> None:
    s = site.seeder
    gates = {"min_accuracy": 0.3, "no_worse_than_champion": True, "max_class_f1_drop": 0.1}
    s.template("browser-pets", gates)  # promotion by hand only
    first = s.template_run("browser-pets", [1.0] * 6)
    page.goto(f"/runs/{first}")
    expect(page.locator(".gate-title")).to_contain_text("✓ passed")
    page.click("button:has-text('Promote to champion')")
    expect(page).to_have_url(f"{site.url}/runs/{first}?notice=promoted")
    expect(page.locator(".notice")).to_contain_text("Promoted")
    expect(page.locator(".champion-line")).to_contain_text("current champion of template")
    expect(page.locator("button:has-text('Promote to champion')")).to_have_count(0)

    # A challenger that is worse on 12 of the same 36 samples and loses F1 in 5 classes.
    worse = s.template_run("browser-pets", [1.0, 1.0, 0.5, 0.5, 1.0, 0.0])
    page.goto(f"/runs/{worse}")
    gate = page.locator(".gate")
    expect(gate.locator(".gate-title")).to_contain_text("✕ failed")
    expect(gate.locator(".check-failed")).to_have_count(2)
    expect(gate.locator(".check-failed").first).to_contain_text(f"p = {0.5**12:.4g} < 0.05")
    gate.locator("summary", has_text="Per-class F1").click()
    expect(gate.locator("table.drops tbody tr")).to_have_count(5)
    expect(page.locator("button:has-text('Promote to champion')")).to_have_count(0)
    page.click("summary:has-text('Promote anyway')")
    shoot(page, "run-gate-failed")

    # The plain promotion (a page opened before the gate failed) is refused on the run's page.
    form = page.locator("form[action$=promote]")
    fields = {
        name: form.locator(f"input[name={name}]").input_value()
        for name in ("csrf_token", "form_key")
    }
    refused = page.request.post(f"/runs/{worse}/promote", form=fields)
    assert refused.status == 409 and "Gate failed: this run failed its quality gate" in (
        refused.text()
    )

    # Promote anyway: the browser wants a note first, then the run is champion.
    page.click("button:has-text('Promote anyway')")
    expect(page).to_have_url(f"{site.url}/runs/{worse}")  # not sent: the note is required
    page.fill("#promote-note", "the evaluation split changed")
    page.click("button:has-text('Promote anyway')")
    expect(page).to_have_url(f"{site.url}/runs/{worse}?notice=promoted")
    expect(page.locator(".champion-line")).to_contain_text("current champion of template")
    expect(page.locator("summary:has-text('Promote anyway')")).to_have_count(0)
    shoot(page, "run-champion")

    # The runs list marks the current champion, and only it.
    page.goto("/")
    expect(page.locator(f"tr:has-text('{worse}') .champion-mark")).to_have_count(1)
    expect(page.locator(f"tr:has-text('{first}') .champion-mark")).to_have_count(0)
    expect(page.locator("table.runs .champion-mark")).to_have_count(1)
    shoot(page, "runs-champion")


def test_the_runs_table_fits_a_laptop_screen(page: Page) -> None:
    """At 1280 px every column, Age included, shows without sideways scrolling; narrower
    (above the phone layout) the less important columns give way first."""
    for width in (1280, 1100, 1000):
        page.set_viewport_size({"width": width, "height": 860})
        page.goto("/")
        sizes = page.evaluate(
            "() => { const t = document.querySelector('table.runs');"
            " return [t.scrollWidth, t.closest('.table-wrap').clientWidth]; }"
        )
        assert sizes[0] <= sizes[1], (width, sizes)
        age = page.locator("table.runs thead th", has_text="Age")
        expect(age).to_be_in_viewport()
    page.set_viewport_size(DESKTOP)
    expect(page.locator("table.runs thead th", has_text="Train / eval")).to_be_visible()
