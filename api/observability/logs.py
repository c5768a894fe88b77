"""Logs as JSON lines with the fields Cloud Logging reads, when `TUNEPLANE_LOG_FORMAT=json`.

Cloud Run sends each line a container writes to Cloud Logging, and a line that is a JSON object
becomes a structured entry: `severity` sets the entry's level, `message` its text, `time` its
timestamp, and `logging.googleapis.com/trace` (`projects/P/traces/T`) and
`logging.googleapis.com/spanId` tie it to the request's trace, so the request log and every line
it caused show together ("Special JSON fields in messages",
https://cloud.google.com/logging/docs/structured-logging). The trace comes from the request's
`X-Cloud-Trace-Context: TRACE/SPAN;o=1` (Cloud Run's load balancer sets it) or W3C
`traceparent`. `run_id` and `execution` are added when known: from the request path's run id, or
from a log call's `extra={"run_id": ..., "execution": ...}` (the dispatch worker's).

Plain text (the default) leaves logging as uvicorn sets it up.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

_trace: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar(
    "tuneplane_trace", default=None
)
_run_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("tuneplane_run", default=None)
_CLOUD_TRACE = re.compile(r"^([0-9a-fA-F]{32})(?:/([0-9]{1,20}))?")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
_RUN_PATH = re.compile(r"^/(?:api/v1/)?runs/(run_[A-Za-z0-9_-]{1,36})(?:/|$)")
# The trainers' callback endpoints (one event, a batch), as uvicorn's access line names them.
_CALLBACK_PATH = re.compile(r"^/api/v1/runs/[^/?]+/events(:batch)?$")
# Python's level names as Cloud Logging's LogSeverity names.
_SEVERITY = {"WARNING": "WARNING", "CRITICAL": "CRITICAL", "ERROR": "ERROR", "INFO": "INFO"}


def trace_of(headers: dict[bytes, bytes]) -> tuple[str, str | None] | None:
    cloud = _CLOUD_TRACE.match(headers.get(b"x-cloud-trace-context", b"").decode("latin-1"))
    if cloud:
        return cloud.group(1).lower(), cloud.group(2)
    w3c = _TRACEPARENT.match(headers.get(b"traceparent", b"").decode("latin-1"))
    if w3c:
        return w3c.group(1), str(int(w3c.group(2), 16))
    return None


class RequestContext:
    """ASGI middleware: the request's trace and run id, for every line logged while it runs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        run = _RUN_PATH.match(scope.get("path", ""))
        trace_token = _trace.set(trace_of(dict(scope["headers"])))
        run_token = _run_id.set(run.group(1) if run else None)
        try:
            await self.app(scope, receive, send)
        finally:
            _trace.reset(trace_token)
            _run_id.reset(run_token)


class CloudLoggingFormatter(logging.Formatter):
    def __init__(self, project: str | None = None) -> None:
        super().__init__()
        self.project = project

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelname, "DEBUG"),
            "message": message,
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "logger": record.name,
        }
        trace = _trace.get()
        if trace is not None:
            trace_id, span = trace
            prefix = f"projects/{self.project}/traces/" if self.project else ""
            entry["logging.googleapis.com/trace"] = prefix + trace_id
            if span:
                entry["logging.googleapis.com/spanId"] = span
        run_id = getattr(record, "run_id", None) or _run_id.get()
        if run_id:
            entry["run_id"] = run_id
        execution = getattr(record, "execution", None)
        if execution:
            entry["execution"] = execution
        return json.dumps(entry, ensure_ascii=False, default=str)


class QuietCallbacks(logging.Filter):
    """Leaves the trainers' accepted callbacks (a 2xx to a POST of .../events or
    .../events:batch) out of uvicorn's access log: a sweep posts hundreds a second, the lines
    say nothing /metrics does not count (`tuneplane_callbacks_total`), and writing them was a
    sixth of a callback's CPU (bench/ingest.py). Refused callbacks and every other request
    are logged as before."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn's access line: (client, method, path with query, HTTP version, status).
        if not isinstance(args, tuple) or len(args) != 5:
            return True
        _client, method, path, _version, status = args
        return not (
            method == "POST"
            and isinstance(status, int)
            and 200 <= status < 300
            and isinstance(path, str)
            and _CALLBACK_PATH.match(path) is not None
        )


def uvicorn_log_config(log_format: str, project: str | None) -> dict[str, Any] | None:
    """The `log_config` for uvicorn: None keeps uvicorn's default (text); JSON sends uvicorn's
    loggers and tuneplane's through one JSON handler on stderr."""
    if log_format != "json":
        return None
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {"()": CloudLoggingFormatter, "project": project},
        },
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": sys.stderr}
        },
        "root": {"handlers": ["stderr"], "level": "INFO"},
        "loggers": {
            **{
                name: {"handlers": [], "level": "INFO", "propagate": True}
                for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "tuneplane")
            },
            # httpx logs every request's full URL at INFO: a webhook URL may hold its own
            # secret (Slack's and Teams' do), so only its warnings pass.
            "httpx": {"level": "WARNING"},
            "httpcore": {"level": "WARNING"},
        },
    }
