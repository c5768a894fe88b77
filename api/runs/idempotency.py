"""`Idempotency-Key` for any creating POST: same key and same request → the same resource;
same key and a different request → 409.

How it stays correct under concurrency: the key row is inserted in the same transaction as the
resource it names, and (scope, key) is the table's primary key. Of two concurrent requests with
one key, the database lets one commit; the other's insert fails on the unique key (PostgreSQL
blocks it until the winner commits; SQLite serializes writers), so it rolls back everything it
created and answers with the winner's resource. Nothing is held in memory, so this also holds
across several api replicas.

Keys are kept (no expiry): a CI pipeline that retries a retrain days later still gets its run.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any, NamedTuple

from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, select

from api.db import UTCDateTime, utcnow
from api.errors import Problem

HEADER = "Idempotency-Key"
# Visible ASCII, like every other token in an HTTP header; the column holds 200 characters.
KEY_PATTERN = r"^[\x21-\x7e]{1,200}$"
_KEY = re.compile(KEY_PATTERN)


class Outcome(NamedTuple):
    resource_id: str
    created: bool  # False: an earlier request with the same key made it


def request_hash(request: BaseModel | dict[str, Any], **context: Any) -> str:
    """SHA-256 of the request's canonical JSON (sorted keys, defaults filled in), so that two
    bodies that mean the same thing hash the same. `context` adds what the URL says (a parent
    run's id) so that one key used on two different resources is a conflict, not a replay."""
    data = request.model_dump(mode="json") if isinstance(request, BaseModel) else dict(request)
    if context:
        data = {"__context__": context, "request": data}
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_key(key: str) -> str:
    if not _KEY.match(key):
        raise Problem(
            422,
            "Invalid Idempotency-Key",
            "the Idempotency-Key header must be 1 to 200 visible ASCII characters",
            errors=[{"field": f"header.{HEADER}", "message": "1 to 200 visible ASCII characters"}],
        )
    return key


def create_once(
    session: Session,
    *,
    scope: str,
    key: str | None,
    fingerprint: str,
    create: Callable[[], str],
) -> Outcome:
    """Run `create` (which adds rows to `session` without committing and returns the new
    resource's id) and commit, at most once per (scope, key).

    `scope` names the operation ("runs.create"), `fingerprint` is `request_hash(...)` of the
    request. Without a key this is just `create` plus a commit.
    """
    if key is None:
        resource_id = create()
        session.commit()
        return Outcome(resource_id, True)
    check_key(key)
    existing = _lookup(session, scope, key)
    if existing is not None:
        return _replay(existing, fingerprint)
    resource_id = create()
    session.add(
        IdempotencyKey(scope=scope, key=key, request_hash=fingerprint, resource_id=resource_id)
    )
    try:
        session.commit()
    except IntegrityError:
        # Lost a race with a request carrying the same key: drop our copy, answer with theirs.
        session.rollback()
        existing = _lookup(session, scope, key)
        if existing is None:  # the violation was not about the key: a real error
            raise
        return _replay(existing, fingerprint)
    return Outcome(resource_id, True)


def _lookup(session: Session, scope: str, key: str) -> IdempotencyKey | None:
    stmt = select(IdempotencyKey).where(IdempotencyKey.scope == scope, IdempotencyKey.key == key)
    return session.exec(stmt.execution_options(populate_existing=True)).first()


def _replay(row: IdempotencyKey, fingerprint: str) -> Outcome:
    if row.request_hash != fingerprint or row.resource_id is None:
        raise Problem(
            409,
            "Idempotency-Key reused",
            f"this Idempotency-Key was first used {row.created_at:%Y-%m-%d %H:%M:%S} UTC with a "
            "different request; use a new key for a new request",
            idempotency_key=row.key,
        )
    return Outcome(row.resource_id, False)


class IdempotencyKey(SQLModel, table=True):
    __tablename__ = "idempotency_keys"

    # The key is scoped by route ("POST /api/v1/runs"), so one key can't collide across routes.
    scope: str = Field(primary_key=True, max_length=200)
    key: str = Field(primary_key=True, max_length=200)
    request_hash: str = Field(max_length=64)
    resource_id: str | None = Field(default=None, max_length=40)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
