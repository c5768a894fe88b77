"""Outgoing webhook deliveries: one row per (run end, webhook URL), kept after it is sent.

A row is written in the same unit of work that ends the run, so a crash between the run ending
and the post leaves a pending row for the notifier to send, never a lost notification (the
outbox shape, api/outbox.py).
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, field_validator
from sqlalchemy import JSON, Column
from sqlmodel import Field

from api.db import UTCDateTime, new_id
from api.outbox import OutboxRow


class WebhookDelivery(OutboxRow, table=True):
    __tablename__ = "webhook_deliveries"

    id: str = Field(default_factory=lambda: new_id("dlv"), primary_key=True, max_length=40)
    run_id: str = Field(foreign_key="runs.id", index=True, max_length=40)
    template_name: str = Field(max_length=100)
    template_version: int
    url: str = Field(max_length=2000)
    event: str = Field(max_length=40)
    payload: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    # status: pending -> delivered | failed (after the last attempt)
    last_status_code: int | None = None
    delivered_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


# What `display_url` puts where it left something out.
HIDDEN = "/…"


def display_url(url: str) -> str:
    """`url` as logs, delivery lists and template views show it: scheme, host and port only,
    and `/…` where anything else was left out. Many receivers (Slack, Teams, Discord) put their
    credential in the path or query, and a user:password is one, so whoever reads a delivery
    list, a template or a log must not learn it; the template itself still holds the whole URL
    (template views add the hook's tag, `template_url`, and a body that sends a URL back in that
    form keeps it, api/templates/service.py).
    """
    parts = urlsplit(url)
    hidden = parts.path not in ("", "/") or parts.query or parts.fragment or parts.netloc.count("@")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}" + (HIDDEN if hidden else "/")


def is_display_form(url: str) -> bool:
    """Whether `url` is what `display_url` shows of some URL with a part left out (so it is
    never a URL to post to; without a tag it cannot say which stored hook it means)."""
    return url.endswith(HIDDEN) and display_url(url) == url


# A template's webhook as its views show it: `display_url`, then `#k=` and the hook's tag.
_SHOWN = re.compile(r"^(?P<url>.+)#k=[0-9a-f]{8}$")


def webhook_tag(url: str) -> str:
    """8 hex digits of the URL's SHA-256: tells apart the webhooks of a template that
    `display_url` shows alike (two on hooks.slack.com), and stays the same while the URL does.
    Not a leak: 32 bits of a one-way hash say nothing a reader can use about a URL whose
    credential is a long random path (Slack's has over 100 bits): checking a guess against the
    tag needs the whole URL guessed first. A URL guessable as a whole carries no credential of
    its own (its secret signs, and that is never shown)."""
    return hashlib.sha256(url.encode()).hexdigest()[:8]


def template_url(url: str) -> str:
    """`url` as template views and forms show it: `display_url` and its tag
    (`https://hooks.slack.com/…#k=1a2b3c4d`), so that a line sent back names one stored hook."""
    return f"{display_url(url)}#k={webhook_tag(url)}"


def is_template_form(url: str) -> bool:
    """Whether `url` is in `template_url`'s form (it then stands for a stored webhook)."""
    m = _SHOWN.match(url)
    return m is not None and display_url(m["url"]) == m["url"]


class WebhookDeliveryPublic(BaseModel):
    """A delivery as the api shows it (the payload is what was posted; no secrets in it, and
    the URL shown by `display_url`)."""

    id: str
    run_id: str
    url: str
    event: str
    status: str
    attempts: int
    next_attempt_at: datetime
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None

    @field_validator("url")
    @classmethod
    def _shown(cls, url: str) -> str:
        return display_url(url)
