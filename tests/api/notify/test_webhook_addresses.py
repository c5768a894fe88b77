"""Webhooks never reach internal addresses (api/notify/address_guard.py): refused when a template
names one, refused again on the address a delivery actually connects to (a name that changes
what it resolves to between the two checks included), redirects not followed, and nothing a
receiver answers shown back. Receivers are real HTTP servers on loopback; loopback is allowed
(`webhook_allowed_networks`) only where a test says so."""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from sqlalchemy import Engine, update
from sqlmodel import select

from api.config import Settings
from api.db import session_scope, utcnow
from api.notify import address_guard
from api.notify.models import WebhookDelivery
from api.notify.service import deliver_due
from tests.api.notify.conftest import World, serving
from tests.api.templating import SPEC, finish, make_template, trigger

SECRET = "receiver-secret-0123456789"
INTERNAL_PAGE = "internal-admin-page: db password is hunter2"

# Every spelling the issue found accepted, and their neighbours.
INTERNAL_URLS = [
    "http://127.0.0.1/hook",
    "http://127.1.2.3:8080/hook",
    "http://[::1]/hook",
    "http://169.254.169.254/computeMetadata/v1/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://metadata/computeMetadata/v1/",
    "http://10.0.0.1/hook",
    "http://172.16.5.4/hook",
    "http://192.168.1.1/hook",
    "http://2130706433/hook",
    "http://0x7f000001/hook",
    "http://0177.0.0.1/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://[::ffff:169.254.169.254]/hook",
    "http://[fe80::1]/hook",
    "http://[fd00::1]/hook",
    "http://0.0.0.0/hook",
    "http://localhost:8000/hook",
    "http://api.localhost/hook",
    "http://100.64.0.1/hook",
]


@dataclass
class Receiver:
    """Answers every post with `status`, `headers` and a body an attacker would like to read."""

    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    posts: list[str] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            rec.posts.append(self.path)
            body = INTERNAL_PAGE.encode()
            self.send_response(rec.status)
            for k, v in rec.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST  # a followed redirect would arrive as a GET

        def log_message(self, *args: Any) -> None:
            pass

    with serving(Handler) as port:
        rec.port = port
        yield rec


@pytest.fixture
def world_of(make_world: Callable[..., World]) -> Callable[..., World]:
    """An api with quick, few webhook retries; keyword arguments are more settings."""
    return functools.partial(make_world, webhook_backoff_seconds=0.01, webhook_max_attempts=2)


def finished_run(w: World, url: str) -> str:
    make_template(w.client, webhooks=[{"url": url, "secret": SECRET}])
    run_id: str = trigger(w.client).json()["run_id"]
    finish(w.client, w.engine, w.settings, run_id, [True] * 10)
    return run_id


def delivery(engine: Engine) -> WebhookDelivery:
    with session_scope(engine) as session:
        (row,) = session.exec(select(WebhookDelivery)).all()
        return row


@pytest.mark.parametrize("url", INTERNAL_URLS)
def test_templates_refuse_internal_webhook_urls(world_of: Callable[..., World], url: str) -> None:
    w = world_of()
    body = {"name": "pets", "spec": SPEC, "webhooks": [{"url": url, "secret": SECRET}]}
    r = w.client.post("/api/v1/templates", json=body)
    assert r.status_code == 422, (url, r.text)
    assert r.json()["errors"][0]["field"] == "body.webhooks.0.url"
    assert "which webhooks may not reach" in r.json()["detail"]
    # Editing an existing template into one is refused too.
    make_template(w.client, webhooks=[{"url": "https://hooks.example/ok", "secret": SECRET}])
    r = w.client.put("/api/v1/templates/pets", json={k: body[k] for k in ("spec", "webhooks")})
    assert r.status_code == 422, (url, r.text)


def test_public_and_unresolvable_names_are_accepted_at_creation(
    world_of: Callable[..., World],
) -> None:
    w = world_of()
    hooks = [
        {"url": "https://hooks.example.com/tuneplane", "secret": SECRET},
        {"url": "http://93.184.216.34/hook", "secret": SECRET},
    ]
    make_template(w.client, webhooks=hooks)


def test_default_refuses_a_real_loopback_receiver_at_delivery(
    world_of: Callable[..., World], receiver: Receiver
) -> None:
    # Made while loopback was allowed (as a row written before this guard existed would be) ...
    allowing = world_of(webhook_allowed_networks=["127.0.0.0/8"])
    run_id = finished_run(allowing, receiver.url)
    # ... delivered by a server with the default: the connection is never made.
    strict = World(allowing.client, allowing.engine, world_of().settings)
    deliver_due(strict.engine, strict.settings)
    row = delivery(strict.engine)
    assert receiver.posts == []
    assert (row.status, row.attempts, row.last_status_code) == ("failed", 1, None)
    assert row.last_error == "127.0.0.1 is a loopback address, which webhooks may not reach"
    shown = allowing.client.get(f"/api/v1/runs/{run_id}/deliveries").json()
    assert shown[0]["last_error"] == row.last_error


def test_a_name_rebound_to_loopback_after_creation_is_refused_at_connect_time(
    world_of: Callable[..., World], receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: `rebind.test` resolves to a public address when the template is made and
    to 127.0.0.1 afterwards (the resolver below plays the attacker's DNS server; every other
    name, and every numeric address the socket is then connected to, goes to the real one)."""
    real = socket.getaddrinfo
    answers = iter(["93.184.216.34"])

    def rebinding(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "rebind.test":
            return real(next(answers, "127.0.0.1"), port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    w = world_of()
    finished_run(w, f"http://rebind.test:{receiver.port}/hook")
    deliver_due(w.engine, w.settings)
    row = delivery(w.engine)
    assert receiver.posts == []
    assert row.status == "failed" and "loopback" in (row.last_error or "")


def test_the_guard_connects_to_the_address_it_checked(receiver: Receiver) -> None:
    """Allowed networks let a receiver through, over the guarded transport the notifier uses;
    the same transport refuses it without them."""
    import httpx

    allowed = httpx.Client(transport=address_guard.guarded_transport(["127.0.0.0/8"]))
    receiver.status = 200
    assert allowed.post(receiver.url, content=b"{}").status_code == 200
    refused = httpx.Client(transport=address_guard.guarded_transport([]))
    with pytest.raises(httpx.ConnectError, match="loopback"):
        refused.post(receiver.url, content=b"{}")
    assert len(receiver.posts) == 1


def test_redirects_to_internal_addresses_are_not_followed(
    world_of: Callable[..., World], receiver: Receiver
) -> None:
    receiver.status = 302
    receiver.headers = {"Location": "http://169.254.169.254/computeMetadata/v1/"}
    w = world_of(webhook_allowed_networks=["127.0.0.0/8"])
    finished_run(w, receiver.url)
    deliver_due(w.engine, w.settings)
    row = delivery(w.engine)
    assert receiver.posts == ["/hook"]  # one post, nothing followed
    assert (row.status, row.last_status_code) == ("failed", 302)
    assert row.last_error == "HTTP 302: redirects are not followed"


def test_a_receivers_answer_is_never_shown_back(
    world_of: Callable[..., World], receiver: Receiver
) -> None:
    w = world_of(webhook_allowed_networks=["127.0.0.0/8"])
    run_id = finished_run(w, receiver.url)
    for _ in range(2):  # 500 is retried: both attempts
        deliver_due(w.engine, w.settings)
        with session_scope(w.engine) as session:
            session.execute(update(WebhookDelivery).values(next_attempt_at=utcnow()))
            session.commit()
    row = delivery(w.engine)
    assert len(receiver.posts) == 2 and row.status == "failed"
    assert row.last_error == "HTTP 500"
    shown = w.client.get(f"/api/v1/runs/{run_id}/deliveries").text
    page = w.client.get(f"/runs/{run_id}").text
    for text in (shown, page):
        assert "hunter2" not in text and "internal-admin-page" not in text


def test_allowed_networks_must_be_networks(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ValueError, match="not a network"):
        make_settings(webhook_allowed_networks=["127.0.0.0/33"])
