"""Headless Chromium against a real server seeded with runs in every state.

One server and one browser per test module (starting Chromium and seeding ~200 callback events
cost seconds; the tests that change runs use runs of their own). Every page a test opens is
watched: a JavaScript dialog, an uncaught error, a blocked inline script (a sign that markup got
through unescaped) or a request to anywhere but the server fails the test.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Dialog,
    Page,
    Request,
    Response,
    expect,
    sync_playwright,
)
from sqlalchemy import Engine

from api.config import Settings
from api.db import make_engine, migrate
from api.main import create_app
from tests.browser.seed import Fleet, Seeder, seed_fleet
from tests.conftest import LiveServer

CHROMIUM = os.environ.get("TUNEPLANE_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 375, "height": 812}


@dataclass
class Site:
    url: str
    settings: Settings
    engine: Engine
    seeder: Seeder
    fleet: Fleet


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    data = tmp_path_factory.mktemp("dashboard")
    settings = Settings(
        data_dir=data / "data",
        database_url=f"sqlite:///{data / 'tuneplane.db'}",
        run_worker=False,
    )
    engine = make_engine(settings.db_url)
    migrate(engine)
    server = LiveServer(create_app(settings)).start()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        seeder = Seeder(engine, settings, http)
        yield Site(server.url, settings, engine, seeder, seed_fleet(seeder))
    server.stop()
    engine.dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium and chromium-driver "
            "(apt-get install -y chromium chromium-driver), or set TUNEPLANE_TEST_CHROMIUM"
        )
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield chromium
        chromium.close()


@dataclass
class Watch:
    """What went wrong on the pages of one test, checked when the test ends."""

    origin: str
    problems: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("console", self._console)
        page.on("request", self._request)
        page.on("response", self._response)

    def _dialog(self, dialog: Dialog) -> None:
        self.problems.append(f"dialog: {dialog.message}")
        dialog.dismiss()

    def _console(self, msg: ConsoleMessage) -> None:
        # A blocked inline script or handler means markup reached the page unescaped. Failed
        # loads are judged by `_response`: a 4xx page (a form with errors) is expected.
        if msg.text.startswith("Failed to load resource"):
            return
        if msg.type == "error" or "Content Security Policy" in msg.text:
            self.problems.append(f"console {msg.type}: {msg.text}")

    def _response(self, response: Response) -> None:
        # Pages may answer 4xx on purpose; what a page loads (CSS, script, polls) may not fail.
        if response.status >= 400 and response.request.resource_type != "document":
            self.problems.append(f"{response.status} for {response.url}")

    def _request(self, request: Request) -> None:
        url = request.url
        if not (url.startswith(self.origin) or url.startswith("data:") or url == "about:blank"):
            self.problems.append(f"request left the server: {url}")


@pytest.fixture
def watch(site: Site) -> Iterator[Watch]:
    w = Watch(site.url)
    yield w
    assert not w.problems, "\n".join(w.problems)


# Waits in the browser end when what they wait for is on the page; the limit only guards
# against a hang (Playwright's 5 s default for `expect` is reached by a loaded machine).
HANG_GUARD_MS = 120_000
expect.set_options(timeout=HANG_GUARD_MS)


@pytest.fixture
def page(browser: Browser, site: Site, watch: Watch) -> Iterator[Page]:
    context = browser.new_context(viewport=DESKTOP, base_url=site.url)
    context.set_default_timeout(HANG_GUARD_MS)
    pg = context.new_page()
    watch.attach(pg)
    yield pg
    context.close()


@pytest.fixture
def shoot() -> Callable[[Page, str], None]:
    """`shoot(page, name)`: screenshots of the page at desktop and phone width (full length) in
    test-artifacts/screenshots/, then the desktop size again."""

    def _shoot(page: Page, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.evaluate("window.scrollTo(0, 0)")  # else the sticky header lands mid-page
        for label, size in (("desktop", DESKTOP), ("phone", PHONE)):
            page.set_viewport_size(size)
            page.screenshot(path=str(SCREENSHOTS / f"{name}-{label}.png"), full_page=True)
        page.set_viewport_size(DESKTOP)

    return _shoot
