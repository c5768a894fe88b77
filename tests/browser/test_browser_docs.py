"""/docs and /redoc render in Chromium with no network: every script, style, font and image
they need comes from the api itself (api/web/docs.py). A request to anywhere else is refused
by the browser context and fails the test (`Watch`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Route, expect

from api.config import Settings
from api.main import create_app
from tests.browser.conftest import DESKTOP, Watch
from tests.conftest import LiveServer

pytestmark = pytest.mark.browser
REDOCLY_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data = tmp_path_factory.mktemp("docs")
    settings = Settings(
        data_dir=data, database_url=f"sqlite:///{data / 'tuneplane.db'}", run_worker=False
    )
    live = LiveServer(create_app(settings)).start()
    yield live
    live.stop()


@pytest.fixture
def offline_page(browser: Browser, server: LiveServer) -> Iterator[Page]:
    watch, sent_off = Watch(server.url), []
    context = browser.new_context(viewport=DESKTOP, base_url=server.url)

    def only_the_server(route: Route) -> None:
        if route.request.url.startswith(server.url):
            route.continue_()
        else:
            sent_off.append(route.request.url)
            route.abort("internetdisconnected")

    context.route("**/*", only_the_server)
    page = context.new_page()
    watch.attach(page)
    refused_by_csp: set[str] = set()
    page.on("requestfailed", lambda r: r.failure == "csp" and refused_by_csp.add(r.url))
    yield page
    context.close()
    assert not sent_off, f"requests that tried to leave the machine: {sent_off}"
    # ReDoc's sidebar always asks for Redocly's logo: the page's own Content-Security-Policy
    # refuses it in the browser (api/web/docs.py), so it never reaches the network; Watch
    # still sees the attempt. Forgiven only when the refusal was the CSP's.
    if REDOCLY_LOGO in refused_by_csp:
        watch.problems = [p for p in watch.problems if REDOCLY_LOGO not in p]
    assert not watch.problems, "\n".join(watch.problems)


def test_swagger_ui_renders_the_api_offline(offline_page: Page, tmp_path: Path) -> None:
    offline_page.goto("/docs")
    expect(offline_page.locator(".swagger-ui .info .title")).to_contain_text("tuneplane")
    # The operations come from /openapi.json, rendered by the script the api served.
    expect(
        offline_page.locator(".opblock-summary-path", has_text="/api/v1/runs").first
    ).to_be_visible()
    offline_page.screenshot(path=str(tmp_path / "docs.png"))


def test_redoc_renders_the_api_offline(offline_page: Page) -> None:
    response = offline_page.goto("/redoc")
    assert (
        response is not None and "default-src 'self'" in response.headers["content-security-policy"]
    )
    expect(offline_page.locator("h1").first).to_contain_text("tuneplane")
    expect(offline_page.get_by_text("/api/v1/runs", exact=False).first).to_be_attached()
