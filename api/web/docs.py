"""/docs (Swagger UI) and /redoc, with their scripts and styles served by the api itself.

FastAPI's own pages load Swagger UI and ReDoc from a public CDN (and ReDoc its fonts from
Google), so they are blank offline or behind a proxy that blocks it. The files come from the
`fastapi-offline` package, which ships the Swagger UI and ReDoc builds; only FastAPI's page
helpers are used, with the asset URLs pointed at `/docs-assets`. Tested in Chromium with every
request off the server refused (tests/browser/test_browser_docs.py).
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"
ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
FAVICON = "/static/favicon.svg"
# Nothing but the api itself: ReDoc's sidebar always shows Redocly's logo from cdn.redoc.ly, and
# this makes the browser refuse it (the logo hides itself on error) instead of sending a request
# off the machine. Both pages start their script inline (FastAPI's helpers), and ReDoc styles
# inline and searches in a blob: worker, hence those allowances; the document itself is
# rendered by React, escaped.
CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'"
)

router = APIRouter(include_in_schema=False)


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", ""))


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    return _self_only(
        get_swagger_ui_html(
            openapi_url=f"{root}{request.app.openapi_url}",
            title="tuneplane API",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{FAVICON}",
            oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
            # No badge from validator.swagger.io: it would send the document off the machine.
            swagger_ui_parameters={"validatorUrl": None},
        )
    )


@router.get("/docs/oauth2-redirect")
def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    root = _root(request)
    return _self_only(
        get_redoc_html(
            openapi_url=f"{root}{request.app.openapi_url}",
            title="tuneplane API",
            redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{FAVICON}",
            with_google_fonts=False,
        )
    )


def _self_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CSP
    return page


def install(app: FastAPI) -> None:
    """Add the pages and their assets; `app` must be made with docs_url=None, redoc_url=None."""
    app.include_router(router)
    app.mount(ASSETS, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
