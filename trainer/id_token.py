"""Callback credentials from Google instead of the environment (`TUNEPLANE_CALLBACK_AUTH=oidc`).

On Cloud Run the api gives the trainer no token (overrides are readable by project viewers); the
trainer asks the metadata server for an ID token of its own service account, with the api's URL
as audience, and names its execution so the api can bind the token to the run
(api/auth/oidc.py). Tokens last an hour; a fresh one is fetched a few minutes before that.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator

import httpx

EXECUTION_HEADER = "X-Tuneplane-Execution"
REFRESH_BEFORE_SECONDS = 300


def audience_of(callback_url: str) -> str:
    """The api's URL (TUNEPLANE_PUBLIC_URL on the api side): the callback URL up to /api/v1."""
    base, sep, _ = callback_url.partition("/api/v1/")
    if not sep:
        raise ValueError(f"not a tuneplane callback URL: {callback_url}")
    return base


class GoogleIdTokenAuth(httpx.Auth):
    """httpx authentication: a Google-signed ID token (fetched, cached, refreshed) and the
    execution's name on every request."""

    def __init__(self, audience: str, execution: str) -> None:
        self.audience, self.execution = audience, execution
        self._token: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()

    def token(self) -> str:
        with self._lock:
            if self._token is None or time.time() > self._expires - REFRESH_BEFORE_SECONDS:
                # Imported here: only a trainer in oidc mode needs google-auth's transport.
                import google.auth.transport.requests
                from google.auth import jwt
                from google.oauth2 import id_token

                request = google.auth.transport.requests.Request()
                token: str = id_token.fetch_id_token(request, self.audience)
                claims = jwt.decode(token, verify=False)
                self._token, self._expires = token, float(claims.get("exp", time.time() + 600))
            return self._token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        try:
            token = self.token()
        except Exception as exc:  # whatever went wrong, the event must not be lost
            # Like a connection error to the reporter: retried, then spooled, never lost.
            raise httpx.ConnectError(f"no ID token from the metadata server: {exc}") from exc
        request.headers["Authorization"] = f"Bearer {token}"
        request.headers[EXECUTION_HEADER] = self.execution
        yield request
