"""API tokens: make one (its secret is returned once), list, revoke, and check one on a request.

Used by the tokens REST resource, `tuneplane token` (which talks to the database directly, so an
operator can make the first admin token before any token exists) and api/auth/access.py.

Tokens are `tp_` + 43 URL-safe characters (32 random bytes). The database keeps only the hex
SHA-256 of a token. Why plain SHA-256 and not a slow or peppered hash: a token carries 256 bits
of randomness, so a stolen table of hashes can be neither brute-forced nor looked up in a
dictionary, whatever the hash costs. Slow hashes (bcrypt, argon2) protect low-entropy passwords
and would add ~100 ms to every request; a pepper would add a second secret whose loss or rotation
silently invalidates every token, for no gain against 256-bit secrets. The lookup goes through a
unique index on the hash, so a timing difference there reveals at most part of a hash.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import Engine, or_, update
from sqlmodel import Session, col, select

from api.auth.models import ApiToken, TokenCreate
from api.db import session_scope, utcnow
from api.errors import Problem, invalid

TOKEN_PREFIX = "tp_"
SCOPES = ("runs:read", "runs:write", "admin")
TOKEN_SHAPE = re.compile(r"^tp_[A-Za-z0-9_-]{20,100}$")
# Recording every use would make each read request a write; a minute's resolution is enough to
# tell a token in use from a forgotten one.
LAST_USED_RESOLUTION = timedelta(seconds=60)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_scopes(scopes: Iterable[str]) -> list[str]:
    """The scopes, de-duplicated, or ValueError naming the unknown one and the allowed ones."""
    out = list(dict.fromkeys(s.strip() for s in scopes if s.strip()))
    if not out:
        raise ValueError(f"give at least one scope: {', '.join(SCOPES)}")
    for scope in out:
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; the scopes are: {', '.join(SCOPES)}")
    return out


class TokenRefused(Exception):
    """The token is unknown, revoked or expired (the message says which)."""


def create_token(session: Session, body: TokenCreate, created_by: str = "") -> tuple[ApiToken, str]:
    """Store a new token's hash; returns the row and the secret, which is never stored."""
    try:
        scopes = check_scopes(body.scopes)
    except ValueError as exc:
        raise invalid("body.scopes", str(exc)) from None
    secret = new_token()
    token = ApiToken(
        name=body.name,
        token_hash=hash_token(secret),
        hint=secret[:7],
        scopes=scopes,
        created_by=created_by[:100],
        expires_at=(
            utcnow() + timedelta(days=body.expires_in_days) if body.expires_in_days else None
        ),
    )
    session.add(token)
    session.commit()
    session.refresh(token)
    return token, secret


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.exec(select(ApiToken).order_by(col(ApiToken.created_at).desc())))


def find_token(session: Session, ident: str) -> ApiToken:
    """A token by id, or by name when exactly one token that is not revoked has that name."""
    token = session.get(ApiToken, ident)
    if token is not None:
        return token
    named = list(
        session.exec(
            select(ApiToken).where(ApiToken.name == ident, col(ApiToken.revoked_at).is_(None))
        )
    )
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        ids = ", ".join(t.id for t in named)
        raise Problem(
            409, "Ambiguous token name", f"{len(named)} tokens are named {ident!r}: {ids}"
        )
    raise Problem(404, "Not found", f"no token with id or name {ident!r}")


def revoke_token(session: Session, ident: str) -> ApiToken:
    """Revoke (idempotent: revoking a revoked token keeps its first revocation time)."""
    token = find_token(session, ident)
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        session.add(token)
        session.commit()
        session.refresh(token)
    return token


def _check_usable(token: ApiToken | None) -> ApiToken:
    if token is None:
        raise TokenRefused("unknown API token (mistyped, or from another tuneplane?)")
    if token.revoked_at is not None:
        raise TokenRefused(
            f"token {token.name!r} was revoked at {token.revoked_at:%Y-%m-%d %H:%M} UTC"
        )
    if token.expires_at is not None and token.expires_at <= utcnow():
        raise TokenRefused(f"token {token.name!r} expired at {token.expires_at:%Y-%m-%d %H:%M} UTC")
    return token


def _touch(session: Session, token: ApiToken) -> None:
    now = utcnow()
    if token.last_used_at is not None and now - token.last_used_at < LAST_USED_RESOLUTION:
        return
    # A conditional UPDATE, so concurrent requests with one token write it at most once a minute.
    session.execute(
        update(ApiToken)
        .where(
            col(ApiToken.id) == token.id,
            or_(
                col(ApiToken.last_used_at).is_(None),
                col(ApiToken.last_used_at) < now - LAST_USED_RESOLUTION,
            ),
        )
        .values(last_used_at=now)
    )
    session.commit()


def authenticate(engine: Engine, raw: str) -> ApiToken:
    """The usable token whose secret is `raw` (its last-used time recorded), or TokenRefused."""
    with session_scope(engine) as session:
        token = _check_usable(
            session.exec(select(ApiToken).where(ApiToken.token_hash == hash_token(raw))).first()
        )
        _touch(session, token)
        return token


def authenticate_id(engine: Engine, token_id: str) -> ApiToken:
    """The same for a dashboard session, which names its token by id."""
    with session_scope(engine) as session:
        token = _check_usable(session.get(ApiToken, token_id))
        _touch(session, token)
        return token
