"""Errors as `application/problem+json` (RFC 9457). Every error the api returns goes through here:
our own `Problem`s, Starlette's HTTP errors (404 unknown path, 405 wrong method, 413 body too
large), request validation (422, one entry per field with its path), a database out of reach
(503 with Retry-After: clients and trainers retry those) and, last, anything unexpected (500,
without internals: those go to the log)."""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trainer.contract.events import MAX_EVENT_BYTES
from trainer.contract.spec import RunSpec, describe_errors

PROBLEM = "application/problem+json"
log = logging.getLogger("tuneplane.api")


class Problem(Exception):
    """Raise from a service or route to answer with a problem document. `extra` members are
    added to the document (`errors`, `estimate`, ...)."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or title)
        self.status, self.title, self.detail, self.extra = status, title, detail, extra
        self.headers = headers


def invalid(field: str, message: str, title: str = "Invalid request") -> Problem:
    """A 422 for one field: `detail` and `errors` say the same thing, so a client that reads
    either, and the dashboard that puts each error beside its input, agree."""
    return Problem(422, title, f"{field}: {message}", errors=[{"field": field, "message": message}])


class ProblemDocument(BaseModel):
    """The shape of every error response (for the OpenAPI document)."""

    type: str = "about:blank"
    title: str
    status: int
    instance: str | None = None
    detail: str | None = None
    # Flat on purpose: a nested model would put a `$defs` reference into each inline schema.
    errors: list[dict[str, str]] | None = Field(
        None, description="validation errors: `field` (its path, e.g. body.spec.lora_r), `message`"
    )


_DESCRIPTIONS = {
    404: "No such run (or path)",
    409: "Conflicts with the resource's state or an earlier request",
    413: "Request body too large",
    415: "Request body is not JSON",
    422: "Invalid request: `errors` lists each field's path and what is wrong",
    503: "Not ready, busy, or the database is out of reach: retry after `Retry-After`",
}
# Seconds a client is asked to wait when the database did not answer: about a restart's length.
DATABASE_RETRY_AFTER = 5


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: the listed error codes as problem documents."""
    schema = ProblemDocument.model_json_schema()
    schema["additionalProperties"] = True  # `estimate`, `idempotency_key`, ... per problem
    return {
        code: {
            "description": _DESCRIPTIONS.get(code, HTTPStatus(code).phrase),
            "content": {PROBLEM: {"schema": schema}},
        }
        for code in codes
    }


def problem_response(
    request: Request,
    status: int,
    title: str,
    detail: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "instance": request.url.path,
    }
    if detail:
        body["detail"] = detail
    body.update({k: v for k, v in extra.items() if k not in body})
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def validation_errors(exc: RequestValidationError) -> list[dict[str, str]]:
    """One `{"field", "message"}` per error. Errors inside a run spec are described by
    `trainer.contract.spec.describe_errors`, so a range error names the whole range (pydantic names
    one side) and the REST api, the dashboard and the trainer's command line say the same thing."""
    out: list[dict[str, str]] = []
    spec_errors: list[dict[str, str]] | None = None
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if loc[:2] == ["body", "spec"] and len(loc) > 2:
            if spec_errors is None:
                spec_errors = _spec_errors(exc.body)
                out.extend(spec_errors)
            if spec_errors:
                continue
        out.append({"field": ".".join(loc) or "(request)", "message": _message(err)})
    return out


def _spec_errors(body: Any) -> list[dict[str, str]]:
    spec = body.get("spec") if isinstance(body, dict) else None
    if not isinstance(spec, dict):
        return []
    try:
        RunSpec.model_validate(spec)
    except ValidationError as exc:
        return [{**e, "field": f"body.spec.{e['field']}"} for e in describe_errors(exc)]
    return []


def _message(err: dict[str, Any]) -> str:
    kind = err.get("type")
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "json_invalid":
        return f"not valid JSON: {err.get('ctx', {}).get('error', 'decode error')}"
    message: str = err.get("msg", "invalid")
    return message.removeprefix("Value error, ")


# Request body limits by path, first match wins; the default is the largest legitimate body
# (a trainer's evaluation event with every prediction).
BODY_LIMITS: list[tuple[re.Pattern[str], int]] = [
    (re.compile(r"^/api/v1/runs(/[^/]+/(retrain|cancel))?/?$"), 256 * 1024),
    # The dashboard's forms and the login: a few fields each, so the run request's limit. Below
    # Starlette's own per-field 1 MiB (a 400), so an oversized form is a 413 like any body.
    (re.compile(r"^/(?!api/)"), 256 * 1024),
]


class BodyLimit:
    """413 as a problem document for a body over its path's limit, before the body is read
    (by Content-Length) or while it streams in (chunked). Starlette's own limiter answers in
    plain text, and replaces any response once Content-Length is over, so it is not used."""

    def __init__(self, app: ASGIApp, default: int = MAX_EVENT_BYTES) -> None:
        self.app, self.default = app, default

    def limit_for(self, path: str) -> int:
        return next((n for pattern, n in BODY_LIMITS if pattern.match(path)), self.default)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        too_large = f"the request body is over this endpoint's limit of {limit:,} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        # At most 18 digits: `int` refuses over 4300 (a 500), and no body is an exabyte.
        number = length is not None and length.isdigit() and len(length) <= 18
        if length is not None and (not number or int(length) > limit):
            status = 413 if length.isdigit() else 400
            title = HTTPStatus(status).phrase
            detail = too_large if status == 413 else "Content-Length is not a number"
            await problem_response(Request(scope), status, title, detail)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Starlette's HTTPException passes through FastAPI's body parsing to the
                    # handler below, which answers with a problem document.
                    raise StarletteHTTPException(413, too_large)
            return message

        await self.app(scope, limited, send)


def install(app: FastAPI) -> None:
    app.add_middleware(BodyLimit)

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(
            request, exc.status, exc.title, exc.detail, exc.headers, **exc.extra
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            title = HTTPStatus(exc.status_code).phrase
        except ValueError:
            title = "Error"
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail != title else None
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 400 and isinstance(exc.__cause__, ValueError | RecursionError):
            # FastAPI's "error parsing the body": bytes that are not UTF-8, or JSON nested too
            # deeply. The same 422 as any other body that is not valid JSON.
            message = "not valid JSON (not UTF-8 text, or nested too deeply)"
            return problem_response(
                request, 422, "Invalid request", f"body: {message}",
                errors=[{"field": "body", "message": message}],
            )  # fmt: skip
        if exc.status_code == 405:
            # Starlette names only the first matching route's methods; Allow must list all.
            allowed = _allowed_methods(request)
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
            detail = f"{request.method} is not allowed here; allowed: {', '.join(allowed)}"
        return problem_response(request, exc.status_code, title, detail, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = validation_errors(exc)
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        return problem_response(request, 422, "Invalid request", detail, errors=errors)

    @app.exception_handler(DataError)
    async def _data(request: Request, exc: DataError) -> JSONResponse:
        # The database refused a value (a number beyond its integer type, text it cannot
        # store). Routes validate their input so this should not happen; if one misses a
        # bound, the client still gets a 4xx it can act on rather than a 500.
        log.warning("database refused a value on %s %s: %s", request.method, request.url.path, exc)
        return problem_response(
            request,
            422,
            "Invalid request",
            "a value in this request is out of the range the database can store",
        )

    async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # A server restarting, failing over or out of reach, a lock not granted in time, the
        # pool empty: transient, so a 503 the client (and the trainer's reporter) retries, not a
        # 500. The driver's text names the host and port: the log has it, the answer does not.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, first)
        return problem_response(
            request,
            503,
            "Database unavailable",
            f"the database did not answer ({type(exc).__name__}); try again after "
            f"{DATABASE_RETRY_AFTER} s",
            headers={"Retry-After": str(DATABASE_RETRY_AFTER)},
        )

    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(PoolTimeout, _database_unavailable)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this response is sent; the client gets no internals.
        return problem_response(
            request,
            500,
            "Internal Server Error",
            "an unexpected error; the server's log has the details",
        )


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> list[str]:
    # Ask the routes (FastAPI nests included routers) which methods fully match this path.
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(r.matches({**request.scope, "method": method})[0] == Match.FULL for r in routes)
    ]


def require_json(request: Request) -> None:
    """Dependency of routes with a JSON body: a body of another media type is a 415, not a
    confusing "input should be an object" 422."""
    content_type = request.headers.get("content-type")
    length = request.headers.get("content-length")
    if length == "0" or (length is None and "transfer-encoding" not in request.headers):
        return  # no body at all: nothing to type
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media == "application/json" or (
            media.startswith("application/") and media.endswith("+json")
        ):
            return
    raise Problem(
        415,
        "Unsupported Media Type",
        f"the request body must be application/json (got {content_type or 'no Content-Type'})",
        headers={"Accept-Post": "application/json"},
    )
