"""Trainer callbacks authenticated by a Google-signed OIDC ID token (`CALLBACK_AUTH=oidc`).

Why: a `run_job` override's environment, the per-run HMAC token included, is readable by every
project member with `run.executions.get` (the Viewer role). An ID token is minted by the metadata
server for the code running as the trainer's service account only, lives an hour, and never
appears in the execution's configuration.

A callback passes when its bearer token is an ID token that Google signed (certificates fetched
once and cached, fetched again on an unknown key id: Google rotates them), for audience
`TUNEPLANE_PUBLIC_URL`, from Google's issuer, for the trainer's service account with a verified
email, and when the `X-Tuneplane-Execution` header names the execution that the api stored for
this run at dispatch (the token alone says nothing about which run it is for). Every trainer
shares one service account and the header is the caller's own claim, so the api also asks Cloud
Run (`get_execution`) that the named execution is one of our Jobs', carries this run's
TUNEPLANE_RUN_ID and is still running (`check_execution`; a confirmed answer is kept for
`BINDING_TTL` seconds). A refusal names no execution: a 403 must not tell a caller which name
would pass. What remains is a trainer that knows another run's live execution name (Cloud Run
shows it to project viewers); only a service account per run would close that.

A refusal is a 401 or 403 only when it is the token's fault. When the api cannot decide yet, it
answers 503 with Retry-After, which the trainer retries (trainer/report_http.py drops an event on
any other 4xx, and on Cloud Run its spool file dies with the container): Google's certificates
are out of reach, or the run is waiting for the worker to store the name of the execution it
just started (a fast trainer posts before that).

The callback route depends on `require_callback_credential`: an ID token (in `oidc` mode) is
checked here, anything else goes to the per-run HMAC check (api/auth/callback.py). The trainer
fetches its token with `google.oauth2.id_token.fetch_id_token(request, audience)`, audience =
the callback URL up to `/api/v1`, and sends `CLOUD_RUN_EXECUTION` in the header.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Mapping
from typing import Annotated, Any

import httpx
from fastapi import Header, Request
from google.auth import exceptions as gauth_exc
from google.auth import jwt
from sqlalchemy import Engine

from api.auth.callback import require_run_token
from api.config import Settings
from api.db import session_scope
from api.deps import get_settings, in_database_thread
from api.dispatch.base import DispatchError
from api.errors import Problem
from api.runs.models import Run
from api.runs.states import RunStatus

EXECUTION_HEADER = "X-Tuneplane-Execution"
GOOGLE_ISSUERS = frozenset({"https://accounts.google.com", "accounts.google.com"})
CLOCK_SKEW_SECONDS = 30
DEFAULT_CERT_TTL = 3600.0
MIN_REFETCH_SECONDS = 30.0  # an unknown key id triggers a refetch at most this often
CERTS_RETRY_AFTER = 10  # seconds; Google's endpoint is rarely down for long
DISPATCH_RETRY_AFTER = 2  # seconds; the worker stores the execution right after starting it
BINDING_TTL = 30.0  # seconds a confirmed (execution, run) pair is trusted without asking again


class OidcRejected(Exception):
    """401: no valid token; 403: a valid token that may not post for this run; 503: cannot
    decide now, ask again after `retry_after` seconds."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after

    @classmethod
    def later(cls, message: str, retry_after: int) -> OidcRejected:
        return cls(503, message, retry_after)


class CertCache:
    """Google's public certificates ({key id: PEM}), kept for their `Cache-Control: max-age`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._certs: dict[str, str] = {}
        self._expires = 0.0
        self._rotation_fetched = float("-inf")
        self._failure: str | None = None  # why the last fetch failed; None after a success
        self._lock = threading.Lock()
        self.fetches = 0

    def certs(self, key_id: str | None) -> Mapping[str, str]:
        """The certificates, fetched when stale or when `key_id` is unknown. Raises a 503
        OidcRejected when they cannot be fetched and the cached ones cannot check `key_id`."""
        with self._lock:
            now = time.monotonic()
            known = key_id is None or key_id in self._certs
            if now >= self._expires:
                self._fetch(now)
            elif not known and (
                self._failure is not None or now - self._rotation_fetched >= MIN_REFETCH_SECONDS
            ):
                # Google rotated its keys, or the token is forged: ask once, not per request
                # (unless the last ask failed: then the answer is still unknown).
                self._rotation_fetched = now
                self._fetch(now)
            if self._failure is not None and not (
                self._certs and (key_id is None or key_id in self._certs)
            ):
                # Nothing against the token: it cannot be checked now. (Cached certificates
                # that know its key still check it, rather than refuse every callback.)
                raise OidcRejected.later(
                    f"cannot check the ID token now: Google's certificates are out of reach "
                    f"({self._failure})",
                    CERTS_RETRY_AFTER,
                )
            return dict(self._certs)

    def _fetch(self, now: float) -> None:
        try:
            response = httpx.get(self.url, timeout=10)
            if response.status_code != 200:
                raise ValueError(f"{response.status_code} from {self.url}")
            certs = response.json()
            if not isinstance(certs, dict):
                raise ValueError(f"{self.url} answered JSON that is not {{key id: certificate}}")
        except (httpx.HTTPError, ValueError) as err:
            self._failure = str(err) or type(err).__name__
            return
        self._failure = None
        self.fetches += 1
        self._certs = {str(k): str(v) for k, v in certs.items()}
        self._expires = now + _max_age(response.headers.get("cache-control", ""))


def _max_age(cache_control: str) -> float:
    for part in cache_control.split(","):
        name, _, value = part.strip().partition("=")
        if name.lower() == "max-age" and value.isdigit():
            return float(value)
    return DEFAULT_CERT_TTL


_caches: dict[str, CertCache] = {}
_caches_lock = threading.Lock()


def cert_cache(url: str) -> CertCache:
    with _caches_lock:
        return _caches.setdefault(url, CertCache(url))


def looks_like_id_token(token: str) -> bool:
    """A JWT (three base64url parts with a JSON header naming an algorithm) rather than one of
    our own HMAC tokens, so the route knows which check to run."""
    return token.count(".") == 2 and "alg" in _header(token)


def _header(token: str) -> dict[str, Any]:
    first = token.split(".")[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(first + "=" * (-len(first) % 4)))
    except (ValueError, UnicodeDecodeError):
        return {}
    return header if isinstance(header, dict) else {}


def verify_id_token(token: str, settings: Settings) -> dict[str, Any]:
    """The token's claims, once signature, expiry, audience, issuer and account check out."""
    if not settings.trainer_service_account:
        raise OidcRejected(
            401, "ID-token callbacks need TUNEPLANE_TRAINER_SERVICE_ACCOUNT set on the api"
        )
    try:
        certs = cert_cache(settings.oidc_certs_url).certs(_header(token).get("kid"))
        claims: dict[str, Any] = jwt.decode(
            token,
            certs=certs,
            audience=settings.public_url.rstrip("/"),
            clock_skew_in_seconds=CLOCK_SKEW_SECONDS,
        )
    except OidcRejected:
        raise
    except (gauth_exc.GoogleAuthError, ValueError) as err:
        raise OidcRejected(401, f"ID token refused: {err}") from err
    if claims.get("iss") not in GOOGLE_ISSUERS:
        raise OidcRejected(401, f"ID token refused: issuer {claims.get('iss')!r} is not Google")
    if claims.get("email") != settings.trainer_service_account or not claims.get("email_verified"):
        raise OidcRejected(
            403,
            f"ID token of {claims.get('email')!r}; only the trainer's service account "
            f"{settings.trainer_service_account} may post events",
        )
    return claims


def verify_callback(
    token: str,
    execution: str | None,
    run_execution_name: str | None,
    settings: Settings,
    *,
    awaiting_dispatch: bool = False,
) -> dict[str, Any]:
    """Authenticate one callback for a run whose stored execution is `run_execution_name`;
    `execution` is the `X-Tuneplane-Execution` header. Raises OidcRejected (401/403/503)."""
    claims = verify_id_token(token, settings)
    check_binding(execution, run_execution_name, awaiting_dispatch=awaiting_dispatch)
    return claims


def check_binding(
    execution: str | None, run_execution_name: str | None, *, awaiting_dispatch: bool = False
) -> None:
    """`awaiting_dispatch`: the run is queued, so the worker may have started an execution whose
    name it has not stored yet; a callback naming another execution may come from that one."""
    if not execution:
        raise OidcRejected(
            401, f"an ID-token callback must name its execution ({EXECUTION_HEADER})"
        )
    same = run_execution_name is not None and _short(execution) == _short(run_execution_name)
    if awaiting_dispatch and not same:
        raise OidcRejected.later(
            "the named execution is not recorded for this run yet (the worker is recording "
            "its dispatch); retry shortly",
            DISPATCH_RETRY_AFTER,
        )
    if not run_execution_name:
        raise OidcRejected(403, "this run has no Cloud Run execution; its events are not taken")
    # Cloud Run gives the task the execution's short name; the api stores the full one.
    if not same:
        raise OidcRejected(403, "the named execution does not serve this run")


_confirmed: dict[tuple[str, str], float] = {}
_dispatchers: dict[str, Any] = {}
_binding_lock = threading.Lock()


def check_execution(settings: Settings, execution_name: str, run_id: str) -> None:
    """Cloud Run's word that `execution_name` (the stored, full name) is live and runs `run_id`.
    Raises OidcRejected: 403 when it is not, 503 when Cloud Run cannot be asked now."""
    key = (execution_name, run_id)
    with _binding_lock:
        if _confirmed.get(key, 0.0) > time.monotonic():
            return
    from api.dispatch.cloudrun import CloudRunDispatcher  # the api needs it only in this mode
    from api.dispatch.cloudrun_status import env_of, is_live, is_ours

    with _binding_lock:
        dispatcher = _dispatchers.get(settings.cloud_run_endpoint or "")
        if dispatcher is None:
            try:
                dispatcher = CloudRunDispatcher(settings, retry_budget_seconds=2.0)
            except Exception as err:  # no Google credentials on this api: not the token's fault
                raise OidcRejected.later(
                    f"cannot reach Cloud Run to check the execution ({type(err).__name__})",
                    CERTS_RETRY_AFTER,
                ) from None
            _dispatchers[settings.cloud_run_endpoint or ""] = dispatcher
    refused = OidcRejected(403, "the named execution does not serve this run")
    if not is_ours(settings, execution_name):
        raise refused
    try:
        found = dispatcher.describe(execution_name)
    except DispatchError as err:
        raise OidcRejected.later(
            f"cannot check the execution with Cloud Run now ({err.message})", CERTS_RETRY_AFTER
        ) from None
    if found is None or env_of(found).get("TUNEPLANE_RUN_ID") != run_id or not is_live(found):
        raise refused
    with _binding_lock:
        _confirmed[key] = time.monotonic() + BINDING_TTL


def _short(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


async def require_callback_credential(
    run_id: str,
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_tuneplane_execution: Annotated[str | None, Header()] = None,
) -> str:
    """FastAPI dependency of the callback route: the run id, once its credential checks out —
    a Google ID token bound to the run's execution (`callback_auth=oidc`), or the run's HMAC
    token (always accepted: runs dispatched before a switch to `oidc` keep reporting).
    Async on purpose: the HMAC check takes microseconds and runs on the event loop (a sync
    dependency costs a worker-thread hop per request, the callback path's largest cost under
    load); only the ID token's check, which may ask Google or Cloud Run, goes to a thread."""
    settings = get_settings(request)
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if (
        settings.callback_auth != "oidc"
        or scheme.lower() != "bearer"
        or not (token and looks_like_id_token(token))
    ):
        return require_run_token(run_id, settings, authorization)
    await in_database_thread(
        request, _check_id_token, run_id, token, settings, x_tuneplane_execution
    )
    return run_id


def _check_id_token(
    engine: Engine, run_id: str, token: str, settings: Settings, execution: str | None
) -> None:
    try:
        # The token first: nobody without a valid one learns whether the run exists.
        verify_id_token(token, settings)
        with session_scope(engine) as session:
            run = session.get(Run, run_id)
            execution_name = run.execution_name if run is not None else None
            queued = run is not None and run.status == RunStatus.queued
        check_binding(execution, execution_name, awaiting_dispatch=queued)
        if settings.dispatcher == "cloudrun" and execution_name:
            check_execution(settings, execution_name, run_id)
    except OidcRejected as exc:
        if exc.status == 401:
            raise Problem(
                401, "Unauthorized", exc.message, headers={"WWW-Authenticate": "Bearer"}
            ) from None
        if exc.status == 503:
            # The trainer retries 429 and 5xx only (any other 4xx drops the event).
            retry = {"Retry-After": str(exc.retry_after or DISPATCH_RETRY_AFTER)}
            raise Problem(503, "Service Unavailable", exc.message, headers=retry) from None
        raise Problem(403, "Forbidden", exc.message) from None
