"""Keyset pagination cursors: opaque to clients, stable while rows are being added.

A cursor holds the sort keys of the last row of a page, (created_at, id), so the next page is
"strictly older than that row". New runs are newer than every cursor, so they never shift a
page that a client is walking, unlike OFFSET.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime

from api.errors import Problem

MAX_CURSOR = 200


def encode_cursor(created_at: datetime, row_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), row_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) in `cursor`; a 422 problem for anything this module did not make."""
    try:
        if len(cursor) > MAX_CURSOR:
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, row_id = json.loads(raw)
        when = datetime.fromisoformat(created)
        if when.tzinfo is None or not isinstance(row_id, str) or not row_id:
            raise ValueError("not a cursor")
        # In UTC here, where a time near datetime's limits with an offset (9999-12-31T23:59-23:59)
        # overflows, rather than in the column type, where the OverflowError would be a 500.
        when = when.astimezone(UTC)
    except (
        ValueError,
        TypeError,
        OverflowError,
        binascii.Error,
        UnicodeDecodeError,
        RecursionError,
    ):
        raise Problem(
            422,
            "Invalid cursor",
            "`cursor` must be a `next_cursor` value from an earlier page, unchanged",
            errors=[{"field": "query.cursor", "message": "not a cursor this api issued"}],
        ) from None
    return when, row_id
