"""The app factory. `tuneplane serve` migrates the database, then serves `create_app()`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import errors, health
from api.auth import network_guard
from api.config import Settings
from api.db import RequestSlots, make_engine
from api.dispatch.worker import Worker
from api.notify.service import Notifier
from api.observability import logs, metrics
from api.routers import api_router, pages_router
from api.secrets import resolve_secrets
from api.web import docs, login
from api.web import pages as dashboard


def create_app(settings: Settings | None = None) -> FastAPI:
    # `sm://` settings become their Secret Manager values before anything reads them.
    settings = resolve_secrets(settings or Settings())
    engine = make_engine(settings.db_url, request_slots=settings.db_pool_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The dispatch worker lives with the app unless it runs alone (`tuneplane worker`).
        worker = notifier = None
        if settings.run_worker:
            worker = Worker(settings, engine)
            worker.start()
            app.state.worker = worker  # `tuneplane serve` stops it before the server
            # Webhooks of finished runs (api/notify/service.py).
            notifier = Notifier(settings, engine)
            notifier.start()
        try:
            yield
        finally:
            if worker is not None:
                worker.stop()
            if notifier is not None:
                notifier.stop()
            engine.dispose()

    app = FastAPI(
        title="tuneplane",
        summary="Fine-tuning runs of vision-language models on serverless GPUs",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served by api/web/docs.py, without a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.request_slots = RequestSlots(settings.db_pool_size, settings.db_wait_seconds)
    errors.install(app)
    login.install(app)  # /login, /logout, and the redirect of LoginRequired
    # /api/v1 first: routes are matched in order, and it has nearly every request (the
    # trainers' callbacks); no other route's path starts with it.
    app.include_router(api_router)
    app.include_router(health.router)
    docs.install(app)
    app.include_router(pages_router)  # the dashboard, behind a login with auth on
    app.mount("/static", dashboard.static_files(), name="static")
    metrics.install(app)  # GET /metrics, and every request counted by its route
    app.add_middleware(logs.RequestContext)  # trace and run id of each log line
    # Outermost (added last): with auth off, only loopback is served, however the app is run.
    network_guard.install(app, settings)
    return app
