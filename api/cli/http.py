"""The HTTP side of the client commands (`tuneplane retrain`, `tuneplane runs`): they talk to the
api only over its REST interface, with the URL and token from `TUNEPLANE_URL` and
`TUNEPLANE_TOKEN` (api/config.py, `ClientSettings`), never to its database."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from api.config import ClientSettings

# Answers worth asking again: the api restarting, a proxy's hiccup, rate limiting.
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class ApiError(Exception):
    """A refused request, worded from the api's problem document."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def make_client(settings: ClientSettings | None = None, timeout: float = 30.0) -> httpx.Client:
    settings = settings or ClientSettings()
    headers = {"User-Agent": "tuneplane-cli/1", "Accept": "application/json"}
    if settings.token is not None:
        headers["Authorization"] = f"Bearer {settings.token.get_secret_value()}"
    return httpx.Client(base_url=settings.url.rstrip("/"), headers=headers, timeout=timeout)


def describe(response: httpx.Response) -> str:
    """`401 Unauthorized: detail` plus each field error of a problem document."""
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code} {response.reason_phrase}: {response.text[:300]}"
    if not isinstance(body, dict):
        return f"{response.status_code} {response.reason_phrase}"
    text = f"{response.status_code} {body.get('title') or response.reason_phrase}"
    if body.get("detail"):
        text += f": {body['detail']}"
    for err in body.get("errors") or []:
        if isinstance(err, dict) and f"{err.get('field')}: {err.get('message')}" not in text:
            text += f"\n  {err.get('field')}: {err.get('message')}"
    return text


def call(
    send: Callable[[], httpx.Response],
    *,
    retry_for: float = 60.0,
    on_retry: Callable[[str], None] | None = None,
) -> httpx.Response:
    """Send, retrying connection errors and transient answers with backoff for `retry_for`
    seconds (safe for creating POSTs only with an Idempotency-Key). Raises ApiError for any
    other error answer, or when the api stays unreachable."""
    deadline = time.monotonic() + retry_for
    delay = 0.5
    while True:
        try:
            response = send()
        except httpx.HTTPError as exc:
            problem = f"cannot reach the api: {exc}"
            status = None
        else:
            if response.status_code < 400:
                return response
            if response.status_code not in TRANSIENT_STATUSES:
                raise ApiError(describe(response), response.status_code)
            problem, status = describe(response), response.status_code
        if time.monotonic() + delay > deadline:
            raise ApiError(problem, status)
        if on_retry is not None:
            on_retry(f"{problem} (retrying in {delay:.0f}s)")
        time.sleep(delay)
        delay = min(delay * 2, 15.0)


def get_json(client: httpx.Client, path: str, **params: Any) -> Any:
    return call(lambda: client.get(path, params=params or None)).json()
