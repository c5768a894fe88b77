"""The per-run credential a trainer signs its callbacks with.

A token is `tpr1.<run id>.<expiry, unix seconds>.<signature>`, the signature being
HMAC-SHA256 over the run id and the expiry with `settings.signing_key`. The worker mints one for
each execution it starts (`mint_token`) and hands it to the trainer in its environment; the
callback route checks it (`require_run_token`). Nothing is stored: the signature is the proof.

Why not a random token kept in the database: the api may be restarted (or scaled out) while a
trainer runs, and a trainer's events may arrive long after dispatch from its spool; an HMAC needs
only the key. Why bound to one run: a token leaked from one execution's environment (Cloud Run
shows overrides to project viewers) can post nothing to any other run, and stops working at its
expiry.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import Header

from api.config import Settings
from api.deps import SettingsDep
from api.errors import Problem

PREFIX = "tpr1"
_DOMAIN = b"tuneplane-callback-v1\n"
_EXPIRY = re.compile(r"[0-9]{1,12}")
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="tuneplane-callbacks"'}


def _signature(key: bytes, run_id: str, expires: int) -> str:
    mac = hmac.new(key, _DOMAIN + f"{run_id}\n{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def mint_token(key: bytes, run_id: str, expires_at: datetime) -> str:
    expires = int(expires_at.timestamp())
    return f"{PREFIX}.{run_id}.{expires}.{_signature(key, run_id, expires)}"


def token_lifetime(settings: Settings, time_budget_minutes: int) -> timedelta:
    """How long an execution's token lasts: the configured lifetime, but never less than the
    execution's own budget plus two hours, so that events spooled during an api outage near the
    end of a segment are still accepted when they are re-sent."""
    configured = timedelta(hours=settings.callback_token_ttl_hours)
    return max(configured, timedelta(minutes=time_budget_minutes, hours=2))


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "Unauthorized", detail, headers=_CHALLENGE)


def verify_token(key: bytes, token: str, run_id: str, now: float | None = None) -> None:
    """Return if `token` is a valid, unexpired credential for `run_id`; else raise a Problem:
    401 for a malformed, forged or expired token, 403 for a genuine token of another run."""
    parts = token.split(".")
    if len(parts) < 4 or parts[0] != PREFIX:
        raise _unauthorized("the bearer token is not a tuneplane callback token")
    # The run id may in principle hold dots; the expiry and the signature never do.
    token_run, expires_text, signature = ".".join(parts[1:-2]), parts[-2], parts[-1]
    # ASCII digits, at most 12 of them: `str.isdigit` also takes superscripts or Arabic-Indic
    # digits (which `int` then refuses or reads), and `int` refuses over 4300 digits; either was
    # a 500 before any signature check. 12 digits reach the year 33658.
    if not _EXPIRY.fullmatch(expires_text):
        raise _unauthorized("the bearer token is not a tuneplane callback token")
    expires = int(expires_text)
    expected = _signature(key, token_run, expires)
    # Constant time: a byte-by-byte compare would let a caller find the signature by timing.
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise _unauthorized("the callback token's signature is not valid")
    if token_run != run_id:
        raise Problem(403, "Forbidden", "this callback token belongs to another run")
    if (time.time() if now is None else now) >= expires:
        raise _unauthorized(
            "the callback token has expired; the run's next execution gets a new one"
        )


def require_run_token(
    run_id: str,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header()] = None,
) -> str:
    """FastAPI dependency of the callback route: the run id, once its bearer token checks out."""
    if not authorization:
        raise _unauthorized("send the run's callback token as `Authorization: Bearer <token>`")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("send the run's callback token as `Authorization: Bearer <token>`")
    verify_token(settings.signing_key, token.strip(), run_id)
    return run_id
