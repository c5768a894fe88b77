"""Webhooks of finished runs (api/notify/service.py), received by a real HTTP server in the test
that checks each signature with its own HMAC code, answers as a test tells it, and keeps every
post."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import select

from api.config import Settings
from api.db import make_engine, migrate, session_scope
from api.main import create_app
from api.notify.models import WebhookDelivery
from api.notify.service import Notifier, deliver_due, verify
from tests.api.notify.conftest import World, serving
from tests.api.templating import finish, make_template, trigger
from tests.conftest import free_port

SECRET = "receiver-secret-0123456789"
# The receivers here listen on loopback, which webhooks may reach only when allowed.
LOOPBACK = ["127.0.0.0/8"]


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    signature_ok: bool


@dataclass
class Receiver:
    """A webhook endpoint: verifies `X-Tuneplane-Signature` against `secret` (independently of
    api/notify/service.py) and answers with the next of `answers` (then 200)."""

    secret: bytes
    answers: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    url: str = ""

    def handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                expected = "sha256=" + hmac.new(receiver.secret, body, hashlib.sha256).hexdigest()
                got = self.headers.get("X-Tuneplane-Signature", "")
                ok = hmac.compare_digest(expected, got)
                receiver.received.append(Received(dict(self.headers), body, ok))
                status, headers = receiver.answers.pop(0) if receiver.answers else (200, {})
                if not ok:
                    status = 401
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver(SECRET.encode())
    with serving(rec.handler()) as port:
        rec.url = f"http://127.0.0.1:{port}/hooks/tuneplane"
        yield rec


@pytest.fixture
def world(make_world: Callable[..., World]) -> World:
    return make_world(
        webhook_backoff_seconds=0.05, webhook_timeout_seconds=5, webhook_allowed_networks=LOOPBACK
    )


def finished_run(w: World, url: str, secret: str | None = SECRET, correct: int = 9) -> str:
    hook: dict[str, Any] = {"url": url} if secret is None else {"url": url, "secret": secret}
    if not w.client.get("/api/v1/templates/pets").is_success:
        make_template(w.client, gates={"min_accuracy": 0.5}, auto_promote=True, webhooks=[hook])
    run_id = trigger(w.client, ci={"git_sha": "abcdef1"}).json()["run_id"]
    finish(w.client, w.engine, w.settings, run_id, [True] * correct + [False] * (10 - correct))
    return run_id


def deliveries(engine: Engine) -> list[WebhookDelivery]:
    with session_scope(engine) as session:
        return list(session.exec(select(WebhookDelivery)))


def deliver_until_settled(w: World, settings: Settings | None = None) -> None:
    deadline = time.monotonic() + 120  # a hang guard: backoffs here are fractions of a second
    while time.monotonic() < deadline:
        deliver_due(w.engine, settings or w.settings)
        if all(d.status != "pending" for d in deliveries(w.engine)):
            return
        time.sleep(0.05)
    raise AssertionError(f"still pending: {deliveries(w.engine)}")


def attempt(w: World) -> tuple[WebhookDelivery, datetime, datetime]:
    """One `deliver_due` of the only delivery, with the clock read before and after it: a next
    attempt is due a delay after an instant between the two, however long the call took."""
    before = datetime.now(UTC)
    assert deliver_due(w.engine, w.settings) == 1
    after = datetime.now(UTC)
    (d,) = deliveries(w.engine)
    return d, before, after


def due_between(d: WebhookDelivery, before: datetime, after: datetime, seconds: float) -> bool:
    delay = timedelta(seconds=seconds)
    return before + delay <= d.next_attempt_at.replace(tzinfo=UTC) <= after + delay


def an_hour_passes(w: World) -> None:
    """Make every pending delivery due now, as an hour's wait would."""
    with session_scope(w.engine) as session:
        for d in session.exec(select(WebhookDelivery)):
            d.next_attempt_at = datetime.now(UTC)
            session.add(d)
        session.commit()


def test_a_finished_run_posts_a_signed_message(world: World, receiver: Receiver) -> None:
    run_id = finished_run(world, receiver.url)
    (pending,) = deliveries(world.engine)
    assert pending.status == "pending" and pending.attempts == 0
    assert deliver_due(world.engine, world.settings) == 1
    (post,) = receiver.received
    assert post.signature_ok
    assert verify(SECRET.encode(), post.body, post.headers["X-Tuneplane-Signature"])
    assert not verify(b"another secret", post.body, post.headers["X-Tuneplane-Signature"])
    assert post.headers["Content-Type"] == "application/json"
    assert post.headers["X-Tuneplane-Event"] == "run.finished"
    message = json.loads(post.body)
    assert post.headers["X-Tuneplane-Delivery"] == message["delivery_id"] == pending.id
    run = message["run"]
    assert (run["id"], run["status"], run["template"], run["template_version"]) == (
        run_id,
        "succeeded",
        "pets",
        1,
    )
    assert run["gate"]["status"] == "passed" and run["gate"]["reasons"]
    assert run["ci"] == {"git_sha": "abcdef1"}
    assert run["final_accuracy"] == pytest.approx(0.9)
    assert run["dashboard_url"] == f"http://127.0.0.1:8000/runs/{run_id}"
    assert message["promoted_to_champion"] is True
    (done,) = deliveries(world.engine)
    assert (done.status, done.attempts, done.last_status_code) == ("delivered", 1, 200)
    assert done.delivered_at is not None
    assert deliver_due(world.engine, world.settings) == 0  # nothing is sent twice
    (listed,) = world.client.get(f"/api/v1/runs/{run_id}/deliveries").json()
    # The path may be the receiver's credential (Slack-style URLs): the list shows the host only.
    host = receiver.url.removesuffix("/hooks/tuneplane")
    assert (listed["status"], listed["attempts"], listed["url"]) == ("delivered", 1, host + "/…")
    listing = world.client.get(f"/api/v1/runs/{run_id}/deliveries").text
    assert SECRET not in listing and "/hooks/tuneplane" not in listing
    assert world.client.get("/api/v1/runs/run_nope/deliveries").status_code == 404


def test_transient_failures_are_retried_with_backoff_and_the_same_body(
    world: World, receiver: Receiver
) -> None:
    receiver.answers = [(503, {}), (429, {"Retry-After": "3600"}), (200, {})]
    finished_run(world, receiver.url)
    d, before, after = attempt(world)
    assert (d.status, d.attempts, d.last_status_code) == ("pending", 1, 503)
    assert due_between(d, before, after, 0.05)  # the first backoff
    time.sleep(0.05)  # the backoff itself (a sleep is at least as long as asked)
    d, before, after = attempt(world)
    assert (d.attempts, d.last_status_code) == (2, 429)
    # The receiver's Retry-After (an hour) beats the backoff (0.1 s). Not due for an hour, so
    # "not due yet" holds however slow this machine is.
    assert due_between(d, before, after, 3600)
    assert deliver_due(world.engine, world.settings) == 0
    an_hour_passes(world)
    d, _, _ = attempt(world)
    assert (d.status, d.attempts, d.last_status_code) == ("delivered", 3, 200)
    bodies = {r.body for r in receiver.received}
    assert len(receiver.received) == 3 and len(bodies) == 1  # a retry is the same message
    assert all(r.signature_ok for r in receiver.received)


def test_a_client_error_is_final(
    world: World, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.answers = [(410, {})]
    finished_run(world, receiver.url)
    with caplog.at_level(logging.WARNING, logger="tuneplane.notify"):
        deliver_due(world.engine, world.settings)
    (d,) = deliveries(world.engine)
    assert (d.status, d.attempts, d.last_status_code) == ("failed", 1, 410)
    assert "HTTP 410" in (d.last_error or "")
    # The warning names the receiver by host: its path may be a credential.
    (warning,) = [r.getMessage() for r in caplog.records if "failed after" in r.getMessage()]
    assert "/hooks/tuneplane" not in warning and "127.0.0.1" in warning


def test_an_unreachable_receiver_gives_up_after_max_attempts(
    world: World, make_settings: Callable[..., Settings]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    finished_run(world, dead)
    settings = make_settings(
        webhook_backoff_seconds=0.01, webhook_max_attempts=3, webhook_allowed_networks=LOOPBACK
    )
    deliver_until_settled(world, settings)
    (d,) = deliveries(world.engine)
    assert (d.status, d.attempts, d.last_status_code) == ("failed", 3, None)
    assert "Connect" in (d.last_error or "")


def test_the_server_secret_signs_webhooks_without_their_own(
    make_settings: Callable[..., Settings], receiver: Receiver
) -> None:
    settings = make_settings(webhook_secret=SECRET, webhook_allowed_networks=LOOPBACK)
    engine = make_engine(settings.db_url)
    migrate(engine)
    with TestClient(create_app(settings)) as client:
        w = World(client, engine, settings)
        finished_run(w, receiver.url, secret=None)
        deliver_due(engine, settings)
    engine.dispose()
    assert receiver.received[0].signature_ok


def test_a_wrong_secret_is_caught_by_the_receiver(world: World, receiver: Receiver) -> None:
    finished_run(world, receiver.url, secret="not-the-receivers-secret")
    deliver_due(world.engine, world.settings)
    assert not receiver.received[0].signature_ok
    (d,) = deliveries(world.engine)
    assert (d.status, d.last_status_code) == ("failed", 401)


def test_concurrent_senders_post_each_delivery_once(world: World, receiver: Receiver) -> None:
    for _ in range(4):
        finished_run(world, receiver.url)
    barrier = threading.Barrier(3)

    def send() -> None:
        barrier.wait()
        deliver_due(world.engine, world.settings)

    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(receiver.received) == 4
    ids = [r.headers["X-Tuneplane-Delivery"] for r in receiver.received]
    assert len(set(ids)) == 4
    assert all(d.status == "delivered" for d in deliveries(world.engine))


def test_the_notifier_thread_sends_without_being_asked(world: World, receiver: Receiver) -> None:
    finished_run(world, receiver.url)
    notifier = Notifier(
        world.settings.model_copy(update={"worker_poll_seconds": 0.05}), world.engine
    )
    notifier.start()
    try:
        deadline = time.monotonic() + 120  # a hang guard
        while not receiver.received and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        notifier.stop()
    assert len(receiver.received) == 1 and receiver.received[0].signature_ok
