"""Templates on the dashboard, in headless Chromium: create one through the form (with errors
first), edit it into version 2, start a run of it; and, on a server with auth on, the login page
and a read-only session sent back to it when it tries to save a template, then logging out.
Screenshots of each page go to test-artifacts/screenshots/ as the other browser tests' do."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect
from sqlmodel import Session

from api.auth.models import TokenCreate
from api.auth.tokens import create_token
from api.config import Settings
from api.db import make_engine, migrate, session_scope
from api.main import create_app
from api.runs.models import Run
from api.templates.models import TemplateVersion
from tests.api.templating import SPEC
from tests.browser.conftest import DESKTOP, HANG_GUARD_MS, Site, Watch
from tests.conftest import LiveServer

pytestmark = pytest.mark.browser

Shoot = Callable[[Page, str], None]


def test_create_edit_and_start_a_template_through_the_forms(
    page: Page, site: Site, shoot: Shoot
) -> None:
    page.goto("/templates")
    page.click("a:has-text('+ New template')")
    expect(page).to_have_url(re.compile(r"/templates/_new$"))
    expect(page.locator("#f-train_size")).to_have_value("1000")  # RunSpec's defaults
    # Gate inputs are named `gates.NAME`: in a CSS `#id` selector the dot would mean a class.
    expect(page.locator('[id="f-gates.significance"]')).to_have_value("0.05")
    shoot(page, "template-new")

    page.fill("#f-name", "Pets!")
    page.fill("#f-dataset", "digits")
    page.fill('[id="f-gates.min_accuracy"]', "1.5")
    page.click("button:has-text('Create template')")
    expect(page.locator("#err-name")).to_contain_text("lowercase letters, digits")
    expect(page.locator("#err-model_id")).to_contain_text("is required")
    expect(page.locator('[id="err-gates.min_accuracy"]')).to_contain_text("between 0 and 1")
    expect(page.locator(".field.has-error #f-name")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#f-dataset")).to_have_value("digits")  # what was typed is kept
    shoot(page, "template-new-errors")

    page.fill("#f-name", "pets-browser")
    page.fill("#f-description", "made in the browser")
    page.fill("#f-model_id", "google/gemma-3-4b-it")
    page.fill("#f-train_size", "200")
    page.fill('[id="f-gates.min_accuracy"]', "0.8")
    page.check('[id="f-gates.no_worse_than_champion"]')
    page.click("button:has-text('Create template')")
    expect(page).to_have_url(re.compile(r"/templates/pets-browser\?notice=template-created$"))
    expect(page.locator(".notice")).to_contain_text("Template created.")
    expect(page.locator("h1")).to_contain_text("v1")
    shoot(page, "template")

    page.click("a:has-text('Edit')")
    expect(page.locator("h1")).to_contain_text("Edit pets-browser")
    expect(page.locator('[id="f-gates.min_accuracy"]')).to_have_value("0.8")
    expect(page.locator('[id="f-gates.no_worse_than_champion"]')).to_be_checked()
    expect(page.locator("#f-train_size")).to_have_value("200")
    page.fill('[id="f-gates.min_accuracy"]', "0.85")
    page.fill("#f-learning_rate", "0.0001")
    shoot(page, "template-edit")
    page.click("button:has-text('Save as version 2')")
    expect(page).to_have_url(re.compile(r"/templates/pets-browser\?notice=template-saved$"))
    expect(page.locator("h1")).to_contain_text("v2")
    with Session(site.engine) as session:
        v1 = session.get(TemplateVersion, ("pets-browser", 1))
        v2 = session.get(TemplateVersion, ("pets-browser", 2))
        assert v1 is not None and v2 is not None
        assert v1.gates["min_accuracy"] == 0.8 and v2.gates["min_accuracy"] == 0.85
        assert v2.spec["learning_rate"] == 1e-4 and v2.spec["train_size"] == 200
        assert v2.description == "made in the browser"

    page.fill("#f-run_name", "started by hand")
    page.click("button:has-text('Start run')")
    expect(page).to_have_url(re.compile(r"/runs/run_[0-9a-f]+\?notice=created$"))
    run_id = page.url.split("/runs/")[1].split("?")[0]
    with Session(site.engine) as session:
        run = session.get(Run, run_id)
        assert run is not None and run.name == "started by hand"
        assert (run.template_name, run.template_version) == ("pets-browser", 2)

    page.goto("/templates")
    expect(page.locator("a:has-text('pets-browser')")).to_be_visible()
    shoot(page, "templates")


def test_login_page_and_a_read_only_session_saving_a_template(
    browser: Browser, tmp_path: Path, shoot: Shoot
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'auth.db'}",
        run_worker=False,
        auth_enabled=True,
    )
    engine = make_engine(settings.db_url)
    migrate(engine)
    with session_scope(engine) as session:
        _, reader = create_token(session, TokenCreate(name="reader", scopes=["runs:read"]))
        _, writer = create_token(session, TokenCreate(name="ci", scopes=["runs:write"]))
    server = LiveServer(create_app(settings)).start()
    watch = Watch(server.url)
    context = browser.new_context(viewport=DESKTOP, base_url=server.url)
    context.set_default_timeout(HANG_GUARD_MS)
    try:
        r = httpx.post(
            f"{server.url}/api/v1/templates",
            json={"name": "pets", "spec": SPEC},
            headers={"Authorization": f"Bearer {writer}"},
        )
        assert r.status_code == 201, r.text
        page = context.new_page()
        watch.attach(page)
        page.goto("/templates/pets/edit")
        expect(page).to_have_url(re.compile(r"/login\?next=%2Ftemplates%2Fpets%2Fedit"))
        expect(page.locator("#f-token")).to_be_visible()
        shoot(page, "login")

        page.fill("#f-token", reader)
        page.click("button:has-text('Log in')")
        expect(page.locator("h1")).to_contain_text("Edit pets")  # reading is allowed
        page.fill('[id="f-gates.min_accuracy"]', "0.9")
        page.click("button:has-text('Save as version 2')")
        # Saving needs runs:write, as PUT /api/v1/templates/pets does.
        expect(page).to_have_url(re.compile(r"/login\?.*why=scope-write"))
        expect(page.locator(".notice")).to_contain_text("lacks runs:write")
        shoot(page, "login-scope")
        with Session(engine) as session:
            assert session.get(TemplateVersion, ("pets", 2)) is None

        # Still signed in as the reader: every page names the token and offers to log out.
        page.goto("/")
        expect(page.locator(".topbar .signed-in")).to_contain_text("reader")
        shoot(page, "signed-in")
        page.click(".topbar button:has-text('Log out')")
        expect(page).to_have_url(re.compile(r"/login\?why=logged-out"))
        page.goto("/history")
        expect(page).to_have_url(re.compile(r"/login\?next=%2Fhistory"))
    finally:
        context.close()
        server.stop()
        engine.dispose()
    assert not watch.problems, "\n".join(watch.problems)
