"""Prometheus metrics at `GET /metrics`, with the standard `prometheus_client` library.

Counters and histograms live in the client's default registry, updated where things happen
(the request middleware below, the dispatch worker, the webhook notifier), so each process
exposes its own, as Prometheus expects of every replica. Runs by state are not a counter of this
process: they are counted in the database at scrape time, so every replica reports the same
truth. `/metrics` answers without a token (scrapers rarely hold one) and shows counts only:
no run ids, names, URLs or errors' texts.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

from fastapi import APIRouter, FastAPI, Response
from fastapi.routing import iter_route_contexts
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import EngineDep
from api.runs import query
from api.runs.states import RunStatus

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

HTTP_REQUESTS = Counter(
    "tuneplane_http_requests_total",
    "HTTP requests answered, by route template, method and status code",
    ["route", "method", "status"],
)
HTTP_SECONDS = Histogram(
    "tuneplane_http_request_seconds",
    "time to answer an HTTP request, by route template",
    ["route", "method"],
    buckets=_LATENCY,
)
CALLBACKS = Counter(
    "tuneplane_callbacks_total",
    "trainer callbacks (POST /api/v1/runs/{id}/events), by status code",
    ["status"],
)
CALLBACK_SECONDS = Histogram(
    "tuneplane_callback_seconds", "time to answer a trainer callback", buckets=_LATENCY
)
DISPATCH_SECONDS = Histogram(
    "tuneplane_dispatch_seconds",
    "time the dispatcher took to start an execution",
    ["dispatcher"],
    buckets=(*_LATENCY, 60, 120),
)
DISPATCH_ERRORS = Counter(
    "tuneplane_dispatch_errors_total",
    "executions that could not be started, by kind (transient, permanent, quota, ...)",
    ["kind"],
)
WEBHOOK_DELIVERIES = Counter(
    "tuneplane_webhook_deliveries_total",
    "webhook delivery attempts, by outcome (delivered, retry, failed, refused)",
    ["outcome"],
)
RECONCILE_LAST = Gauge(
    "tuneplane_reconcile_last_success_timestamp_seconds",
    "when this process's worker last finished a pass over active executions (unix time)",
)
RECONCILE_LAG = Gauge(
    "tuneplane_reconcile_lag_seconds",
    "seconds since this process's worker last finished a pass over active executions",
)
_last_reconcile: list[float] = []
RECONCILE_LAG.set_function(lambda: time.time() - _last_reconcile[-1] if _last_reconcile else 0.0)

_CALLBACK_ROUTE = "/api/v1/runs/{run_id}/events"


def reconciled() -> None:
    """The worker finished a reconcile pass."""
    now = time.time()
    _last_reconcile[:] = [now]
    RECONCILE_LAST.set(now)


class RunsByState(Collector):
    """`tuneplane_runs{state=...}`: runs in each state, counted in the database per scrape."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("tuneplane_database_up", "1 if the database answered this scrape")
        try:
            with Session(self.engine) as session:
                counts = query.status_counts(session)  # the one read path for runs
        except (SQLAlchemyError, OSError):
            # An outage is a metric, not a failed scrape: alerting needs this answer most.
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        family = GaugeMetricFamily("tuneplane_runs", "runs in each state", labels=["state"])
        for state in RunStatus:
            family.add_metric([str(state)], counts.get(str(state), 0))
        yield family


def _templates(app: FastAPI) -> list[tuple[re.Pattern[str], str]]:
    """(regex, template) of every route, in routing order. Matched here, once the answer is
    out, because Starlette routes on a copy of the scope and leaves the route out of ours."""
    out = []
    for route in iter_route_contexts(app.routes):
        path = route.path or ""
        pattern = re.sub(
            r"\\\{(\w+)(:path)?\\\}", lambda m: ".*" if m[2] else "[^/]+", re.escape(path)
        )
        out.append((re.compile(pattern + ("(/.*)?" if not route.methods else "")), path))
    return out


class RequestMetrics:
    """ASGI middleware: counts and times every HTTP request by its route *template* (so run
    ids do not make a label per run); unmatched paths count as `unmatched`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._routes: list[tuple[re.Pattern[str], str]] | None = None

    def _template(self, scope: Scope) -> str:
        if self._routes is None:
            self._routes = _templates(scope["app"])
        path = scope.get("path", "")
        return next((t for rx, t in self._routes if rx.fullmatch(path)), "unmatched")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = self._template(scope)
            elapsed = time.perf_counter() - started
            method = scope["method"]
            HTTP_REQUESTS.labels(route, method, str(status[0])).inc()
            HTTP_SECONDS.labels(route, method).observe(elapsed)
            if route == _CALLBACK_ROUTE and method == "POST":
                CALLBACKS.labels(str(status[0])).inc()
                CALLBACK_SECONDS.observe(elapsed)


router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
def metrics(engine: EngineDep) -> Response:
    per_scrape = CollectorRegistry(auto_describe=False)
    per_scrape.register(RunsByState(engine))  # through EngineDep: it takes a request slot
    body = generate_latest(REGISTRY) + generate_latest(per_scrape)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.add_middleware(RequestMetrics)
