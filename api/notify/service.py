"""Outgoing webhooks: a signed JSON post to each of a template's URLs when one of its runs ends.

Signature: `X-Tuneplane-Signature: sha256=<hex HMAC-SHA256(secret, raw body)>`, the scheme
GitHub uses, so existing verifiers work. The secret is the webhook's own or the server's
`TUNEPLANE_WEBHOOK_SECRET`. A receiver should compare in constant time (`verify` below) and use
`X-Tuneplane-Delivery` (also in the body) to ignore a delivery it has already seen: a retry sends
the same body again.

Durability: `enqueue` writes one `WebhookDelivery` row per URL inside the unit of work that ends
the run; `Notifier` (a thread of the api process, next to the dispatch worker) claims due rows
with a lease in the row, posts them, and records every attempt's outcome (the outbox shape of
api/outbox.py). Connection errors, timeouts, 408, 425, 429 and 5xx are retried with exponential
backoff (honouring a `Retry-After` in seconds) up to `webhook_max_attempts`; any other answer
is final. Redirects are not followed, connections go only to public addresses
(api/notify/address_guard.py), and a receiver's answer is never read: `last_error` holds its
status or the error's kind, nothing it sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from datetime import timedelta
from typing import Any, NamedTuple

import httpx
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from api.config import Settings
from api.db import session_scope, utcnow
from api.notify.address_guard import guarded_transport, is_refusal
from api.notify.models import WebhookDelivery, WebhookDeliveryPublic, display_url
from api.observability.metrics import WEBHOOK_DELIVERIES
from api.outbox import backoff, claim_due
from api.runs.models import Run
from api.runs.query import find_run
from api.templates.models import TemplateVersion

log = logging.getLogger("tuneplane.notify")

EVENT = "run.finished"
SIGNATURE_HEADER = "X-Tuneplane-Signature"
DELIVERY_HEADER = "X-Tuneplane-Delivery"
EVENT_HEADER = "X-Tuneplane-Event"
LEASE = timedelta(minutes=2)
MAX_DELAY_SECONDS = 3600.0
_RETRY_STATUSES = frozenset({408, 425, 429})


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, header: str | None) -> bool:
    """What a receiver does: recompute the signature of the raw body and compare in constant
    time."""
    return header is not None and hmac.compare_digest(sign(secret, body), header)


def enqueue(session: Session, run: Run, version: TemplateVersion, *, promoted: bool) -> None:
    """Queue one delivery per webhook of the run's template version (the caller commits)."""
    for hook in version.webhooks:
        delivery = WebhookDelivery(
            run_id=run.id,
            template_name=version.name,
            template_version=version.version,
            url=hook["url"],
            event=EVENT,
            payload={},
        )
        delivery.payload = {
            "event": EVENT,
            "delivery_id": delivery.id,
            "promoted_to_champion": promoted,
            "run": {
                "id": run.id,
                "name": run.name,
                "status": str(run.status),
                "status_reason": run.status_reason,
                "template": version.name,
                "template_version": version.version,
                "ci": run.ci,
                "gate": {"status": run.gate_status, "reasons": run.gate_reasons or []},
                "baseline_accuracy": run.baseline_accuracy,
                "baseline_macro_f1": run.baseline_macro_f1,
                "final_accuracy": run.final_accuracy,
                "final_macro_f1": run.final_macro_f1,
                "finished_at": run.finished_at.isoformat() if run.finished_at else None,
            },
        }
        session.add(delivery)


def body_of(delivery: WebhookDelivery, public_url: str) -> bytes:
    """The exact bytes posted (and signed): the stored payload plus the run's links."""
    payload: dict[str, Any] = json.loads(json.dumps(delivery.payload))
    base = public_url.rstrip("/")
    payload["run"]["url"] = f"{base}/api/v1/runs/{delivery.run_id}"
    payload["run"]["dashboard_url"] = f"{base}/runs/{delivery.run_id}"
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def _secret(session: Session, delivery: WebhookDelivery, settings: Settings) -> bytes | None:
    version = session.get(TemplateVersion, (delivery.template_name, delivery.template_version))
    for hook in version.webhooks if version else []:
        if hook["url"] == delivery.url and hook.get("secret"):
            return str(hook["secret"]).encode()
    if settings.webhook_secret is not None:
        return settings.webhook_secret.get_secret_value().encode()
    return None


def _error_class(exc: httpx.HTTPError) -> str:
    """What went wrong, by kind only: an exception's text may quote what the other end said."""
    kinds = {
        httpx.ConnectTimeout: "connect timeout",
        httpx.ReadTimeout: "read timeout",
        httpx.ConnectError: "connection refused or unreachable",
        httpx.RemoteProtocolError: "the receiver broke the HTTP protocol",
    }
    for cls, text in kinds.items():
        if isinstance(exc, cls):
            return f"{type(exc).__name__}: {text}"
    return type(exc).__name__


def _outcome(result: Attempt, attempts: int, settings: Settings) -> str:
    """The label of `tuneplane_webhook_deliveries_total` for one attempt."""
    if result.delivered:
        return "delivered"
    if result.error and is_refusal(result.error):
        return "refused"
    return "retry" if result.retry and attempts < settings.webhook_max_attempts else "failed"


def client_for(settings: Settings) -> httpx.Client:
    """The notifier's HTTP client: connections only to checked addresses, no redirects, and no
    proxy from the environment (a proxy would make the connection the guard checks)."""
    return httpx.Client(
        timeout=settings.webhook_timeout_seconds,
        follow_redirects=False,
        trust_env=False,
        transport=guarded_transport(settings.webhook_allowed_networks),
    )


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


class Attempt(NamedTuple):
    delivered: bool
    retry: bool  # worth trying again
    status_code: int | None
    error: str | None
    retry_after: float | None  # the receiver's Retry-After, seconds


def _attempt(
    delivery: WebhookDelivery, body: bytes, secret: bytes, client: httpx.Client
) -> Attempt:
    """Post once."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "tuneplane-webhooks/1",
        EVENT_HEADER: delivery.event,
        DELIVERY_HEADER: delivery.id,
        SIGNATURE_HEADER: sign(secret, body),
    }
    try:
        # Streamed and closed unread: the receiver's answer is never read, stored or shown
        # (it may be an internal service's page), only its status.
        with client.stream("POST", delivery.url, content=body, headers=headers) as response:
            code = response.status_code
            retry_after = _retry_after(response)
    except httpx.HTTPError as exc:
        refused = str(exc) if is_refusal(str(exc)) else ""
        return Attempt(False, not refused, None, refused or _error_class(exc), None)
    if 200 <= code < 300:
        return Attempt(True, False, code, None, None)
    error = f"HTTP {code}" + (": redirects are not followed" if 300 <= code < 400 else "")
    retry = code in _RETRY_STATUSES or code >= 500
    return Attempt(False, retry, code, error, retry_after)


def deliver_due(engine: Engine, settings: Settings, client: httpx.Client | None = None) -> int:
    """Post every due delivery once; returns how many were attempted."""
    own = client is None
    http = client or client_for(settings)
    attempted = 0
    try:
        for delivery_id in claim_due(engine, WebhookDelivery, LEASE, limit=50):
            with session_scope(engine) as session:
                delivery = session.get(WebhookDelivery, delivery_id)
                if delivery is None or delivery.status != "pending":
                    continue
                secret = _secret(session, delivery, settings)
                delivery.attempts += 1
                if secret is None:
                    result = Attempt(
                        False,
                        False,
                        None,
                        "no secret to sign with: the webhook has none and the server has no "
                        "TUNEPLANE_WEBHOOK_SECRET",
                        None,
                    )
                else:
                    body = body_of(delivery, settings.public_url)
                    result = _attempt(delivery, body, secret, http)
                delivered, retry, code, error, after = result
                attempted += 1
                delivery.last_status_code, delivery.last_error = code, error
                delivery.claimed_until = None
                now = utcnow()
                WEBHOOK_DELIVERIES.labels(_outcome(result, delivery.attempts, settings)).inc()
                if delivered:
                    delivery.status, delivery.delivered_at = "delivered", now
                elif retry and delivery.attempts < settings.webhook_max_attempts:
                    wait = backoff(
                        delivery.attempts, settings.webhook_backoff_seconds, MAX_DELAY_SECONDS
                    )
                    delay = min(max(wait.total_seconds(), after or 0.0), MAX_DELAY_SECONDS)
                    delivery.next_attempt_at = now + timedelta(seconds=delay)
                else:
                    delivery.status = "failed"
                    log.warning(
                        "webhook %s to %s failed after %d attempts: %s",
                        delivery.id,
                        display_url(delivery.url),
                        delivery.attempts,
                        error,
                    )
                session.add(delivery)
                session.commit()
    finally:
        if own:
            http.close()
    return attempted


def deliveries_of(session: Session, run_id: str) -> list[WebhookDeliveryPublic]:
    """The run's deliveries, oldest first (404 for an unknown run)."""
    find_run(session, run_id)
    rows = session.exec(
        select(WebhookDelivery)
        .where(WebhookDelivery.run_id == run_id)
        .order_by(col(WebhookDelivery.created_at))
    )
    return [WebhookDeliveryPublic.model_validate(d, from_attributes=True) for d in rows]


class Notifier:
    """Sends due deliveries every `worker_poll_seconds` from a daemon thread."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings, self.engine = settings, engine
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tuneplane-notifier", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        with client_for(self.settings) as client:
            while not self._stop.is_set():
                try:
                    deliver_due(self.engine, self.settings, client)
                except Exception:  # keep notifying after a database hiccup
                    log.exception("sending webhooks failed; trying again")
                self._stop.wait(self.settings.worker_poll_seconds)
