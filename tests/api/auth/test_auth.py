"""API tokens and scopes (api/auth/access.py): every /api/v1 endpoint, found from the app's own
routes, against a missing, a wrong-scope, a revoked and the right token; the dashboard's login; the
token CLI; and `serve` refusing an open api on a network address."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from api.auth.models import ApiToken, TokenCreate
from api.auth.network_guard import ExposureRefused, check_exposure
from api.auth.sessions import make_session, read_session
from api.auth.tokens import create_token, revoke_token
from api.cli import main as cli_main
from api.config import Settings
from api.db import make_engine, migrate, session_scope, utcnow
from api.main import create_app
from tests.api.factories import insert_runs, token_for
from tests.conftest import LiveServer, free_port

TOKENS = {
    "admin": ["admin"],
    "read": ["runs:read"],
    "write": ["runs:write"],
    "readwrite": ["runs:read", "runs:write"],
    "revoked": ["admin"],
    "expired": ["admin"],
}
# Path parameters that pass every route's pattern and name nothing that exists.
SAMPLE_PARAMS = {"run_id": "run_0000000000000000000a", "name": "no-such-template"}
_CALLBACK = re.compile(r"^/api/v1/runs/\{[^}]+\}/events(:batch)?$")  # the run's own token


@dataclass
class Secured:
    client: TestClient
    app: FastAPI
    tokens: dict[str, str]
    settings: Settings
    engine: Engine

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}


@pytest.fixture
def secured(make_settings: Callable[..., Settings]) -> Iterator[Secured]:
    settings = make_settings(auth_enabled=True)
    engine = make_engine(settings.db_url)
    migrate(engine)
    secrets: dict[str, str] = {}
    with session_scope(engine) as session:
        for name, scopes in TOKENS.items():
            _, secrets[name] = create_token(session, TokenCreate(name=name, scopes=scopes))
        revoke_token(session, "revoked")
        expired = session.exec(text("SELECT id FROM api_tokens WHERE name = 'expired'")).one()[0]  # type: ignore[call-overload]
        row = session.get(ApiToken, expired)
        assert row is not None
        row.expires_at = utcnow() - timedelta(minutes=1)
        session.add(row)
        session.commit()
    app = create_app(settings)
    # https: the session cookie is Secure off loopback, and httpx keeps Secure cookies to https.
    with TestClient(app, base_url="https://testserver") as client:
        yield Secured(client, app, secrets, settings, engine)
    engine.dispose()


def api_endpoints(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path template) of every route under /api/v1, from the app itself: an endpoint
    added later is in this list (and so in these tests) without anyone adding it here."""
    out = set()
    for route in iter_route_contexts(app.routes):
        if route.path and route.path.startswith("/api/v1"):
            out |= {(m, route.path) for m in route.methods or () if m != "HEAD"}
    return sorted(out, key=lambda e: (e[1], e[0]))


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)(?::[^}]*)?\}", lambda m: SAMPLE_PARAMS.get(m.group(1), "x1"), path)


def needed_scope(method: str, path: str) -> str:
    """The rule, written out independently of api/auth/access.py."""
    if method == "POST" and _CALLBACK.match(path):
        return "callback"
    if path.startswith("/api/v1/tokens"):
        return "admin"
    return "runs:read" if method == "GET" else "runs:write"


WRONG = {"runs:read": "write", "runs:write": "read", "admin": "readwrite"}
RIGHT = {"runs:read": "read", "runs:write": "write", "admin": "admin"}


def send(s: Secured, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    return s.client.request(method, concrete(path), headers=headers)


def test_endpoint_list_covers_the_api(secured: Secured) -> None:
    endpoints = api_endpoints(secured.app)
    for expected in [
        ("POST", "/api/v1/runs"),
        ("GET", "/api/v1/runs/{run_id}"),
        ("POST", "/api/v1/runs/{run_id}/events"),
        ("POST", "/api/v1/templates/{name}/runs"),
        ("PUT", "/api/v1/templates/{name}"),
        ("DELETE", "/api/v1/tokens/{token_ref}"),
    ]:
        assert expected in endpoints
    assert len(endpoints) >= 20


def test_missing_token_is_401_everywhere(secured: Secured) -> None:
    wrong = []
    for method, path in api_endpoints(secured.app):
        r = send(secured, method, path, {})
        challenge = r.headers.get("www-authenticate", "")
        if r.status_code != 401 or not challenge.startswith("Bearer"):
            wrong.append(f"{method} {path}: {r.status_code} {challenge!r}")
        elif r.headers["content-type"] != "application/problem+json":
            wrong.append(f"{method} {path}: not a problem document")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("who", ["revoked", "expired"])
def test_revoked_and_expired_tokens_are_401_everywhere(secured: Secured, who: str) -> None:
    wrong = []
    for method, path in api_endpoints(secured.app):
        r = send(secured, method, path, secured.headers(who))
        if r.status_code != 401:
            wrong.append(f"{method} {path}: {r.status_code}")
        elif needed_scope(method, path) != "callback":
            word = "revoked" if who == "revoked" else "expired"
            assert word in r.json()["detail"], r.text
    assert not wrong, "\n".join(wrong)


def test_wrong_scope_is_403_everywhere(secured: Secured) -> None:
    wrong = []
    for method, path in api_endpoints(secured.app):
        scope = needed_scope(method, path)
        if scope == "callback":
            continue
        r = send(secured, method, path, secured.headers(WRONG[scope]))
        if r.status_code != 403 or f'scope="{scope}"' not in r.headers.get("www-authenticate", ""):
            wrong.append(f"{method} {path}: {r.status_code} (needs {scope})")
    assert not wrong, "\n".join(wrong)


def test_right_token_gets_past_auth_everywhere(secured: Secured) -> None:
    wrong = []
    for method, path in api_endpoints(secured.app):
        scope = needed_scope(method, path)
        if scope == "callback":
            continue
        for who in (RIGHT[scope], "admin"):  # the least scope that suffices, and admin
            r = send(secured, method, path, secured.headers(who))
            if r.status_code in (401, 403):
                wrong.append(f"{method} {path} with {who}: {r.status_code} {r.text[:200]}")
    assert not wrong, "\n".join(wrong)


def test_callback_endpoint_takes_only_its_per_run_credential(secured: Secured) -> None:
    (run_id,) = insert_runs(secured.engine)
    url = f"/api/v1/runs/{run_id}/events"
    event = {"type": "started", "run_id": run_id, "seq": 0, "id": "e-auth-1"}
    # An API token, even admin, is not a callback credential ...
    r = secured.client.post(url, json=event, headers=secured.headers("admin"))
    assert r.status_code == 401
    # ... and the run's own credential works with API auth on.
    own = {"Authorization": f"Bearer {token_for(secured.settings, run_id)}"}
    r = secured.client.post(url, json=event, headers=own)
    assert r.status_code == 201, r.text


def test_malformed_authorization_headers_are_401(secured: Secured) -> None:
    for header in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer not-a-token", "Bearer tp_short"]:
        r = secured.client.get("/api/v1/runs", headers={"Authorization": header})
        assert r.status_code == 401, header
    forged = "tp_" + "A" * 43
    r = secured.client.get("/api/v1/runs", headers={"Authorization": f"Bearer {forged}"})
    assert r.status_code == 401 and "unknown API token" in r.json()["detail"]


# ---- the tokens resource -------------------------------------------------------------------


def test_token_secret_is_shown_once_and_only_its_hash_is_stored(secured: Secured) -> None:
    r = secured.client.post(
        "/api/v1/tokens",
        json={"name": "ci", "scopes": ["runs:read", "runs:write"]},
        headers=secured.headers("admin"),
    )
    assert r.status_code == 201, r.text
    assert r.headers["cache-control"] == "no-store"
    created = r.json()
    secret = created["token"]
    assert secret.startswith("tp_") and len(secret) >= 40
    assert created["created_by"] == "admin"
    listed = secured.client.get("/api/v1/tokens", headers=secured.headers("admin")).text
    assert secret not in listed and created["id"] in listed
    with session_scope(secured.engine) as session:
        row = session.get(ApiToken, created["id"])
        assert row is not None
        assert row.token_hash == hashlib.sha256(secret.encode()).hexdigest()
        dump = " ".join(str(v) for v in row.model_dump().values())
        assert secret not in dump and secret[3:] not in dump
    # The new token works, records its use, and stops working once revoked.
    ci = {"Authorization": f"Bearer {secret}"}
    assert secured.client.get("/api/v1/runs", headers=ci).status_code == 200
    got = secured.client.get(f"/api/v1/tokens/{created['id']}", headers=secured.headers("admin"))
    assert got.json()["last_used_at"] is not None
    r = secured.client.delete(f"/api/v1/tokens/{created['id']}", headers=secured.headers("admin"))
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    assert secured.client.get("/api/v1/runs", headers=ci).status_code == 401


def test_token_create_refuses_unknown_scopes(secured: Secured) -> None:
    r = secured.client.post(
        "/api/v1/tokens",
        json={"name": "x", "scopes": ["runs:read", "root"]},
        headers=secured.headers("admin"),
    )
    assert r.status_code == 422
    assert "unknown scope 'root'" in r.json()["detail"]
    assert r.json()["errors"][0]["field"] == "body.scopes"


def test_open_mode_needs_no_token(client: TestClient) -> None:
    assert client.get("/api/v1/runs").status_code == 200
    assert client.get("/api/v1/tokens").status_code == 200


# ---- the dashboard ---------------------------------------------------------------------------


def dashboard_pages(app: FastAPI) -> list[tuple[str, str]]:
    out = set()
    for route in iter_route_contexts(app.routes):
        path = route.path or ""
        if path.startswith(("/api/", "/static", "/login", "/logout", "/docs", "/redoc")):
            continue
        if path in ("/openapi.json", "/healthz", "/readyz", "/metrics"):
            continue
        out |= {(m, path) for m in route.methods or () if m != "HEAD"}
    return sorted(out)


def login(s: Secured, who: str, next_path: str = "/") -> httpx.Response:
    page = s.client.get("/login", params={"next": next_path})
    field = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    key = re.search(r'name="form_key" value="([^"]+)"', page.text)
    assert field is not None, page.text
    form = {"csrf_token": field.group(1), "token": s.tokens.get(who, who), "next": next_path}
    if key:
        form["form_key"] = key.group(1)
    return s.client.post("/login", data=form, follow_redirects=False)


def test_every_dashboard_page_redirects_to_login_without_a_session(secured: Secured) -> None:
    pages = dashboard_pages(secured.app)
    assert ("GET", "/") in pages and len(pages) >= 3
    wrong = []
    for method, path in pages:
        r = secured.client.request(method, concrete(path), follow_redirects=False)
        location = r.headers.get("location", "")
        if r.status_code != 303 or not location.startswith("/login?"):
            wrong.append(f"{method} {path}: {r.status_code} {location}")
    assert not wrong, "\n".join(wrong)
    assert secured.client.get("/static/dashboard.css").status_code == 200  # the login page's


def test_login_sets_a_hardened_cookie_and_opens_the_dashboard(secured: Secured) -> None:
    r = login(secured, "read", next_path="/history")
    assert r.status_code == 303 and r.headers["location"] == "/history"
    cookie = r.headers["set-cookie"]
    assert "tuneplane_session=" in cookie
    for attribute in ("HttpOnly", "Secure", "SameSite=lax", "Path=/"):
        assert attribute.lower() in cookie.lower(), cookie
    assert secured.tokens["read"] not in cookie  # the cookie names the token, not its secret
    assert secured.client.get("/", follow_redirects=False).status_code == 200
    assert secured.client.get("/history", follow_redirects=False).status_code == 200
    # The JSON api accepts the session for reads only; a write needs a bearer token.
    assert secured.client.get("/api/v1/runs").status_code == 200
    assert secured.client.post("/api/v1/runs", json={}).status_code == 401


def test_dashboard_form_post_needs_runs_write(secured: Secured) -> None:
    login(secured, "read")
    posts = [p for m, p in dashboard_pages(secured.app) if m == "POST"]
    assert posts
    r = secured.client.post(concrete(posts[0]), data={}, follow_redirects=False)
    assert r.status_code == 303 and "why=scope-write" in r.headers["location"]


@pytest.mark.parametrize(
    ("who", "status", "words"),
    [
        ("tp_" + "B" * 43, 401, "unknown API token"),
        ("revoked", 401, "was revoked"),
        ("write", 403, "lacks runs:read"),
        ("", 400, "Paste an API token"),
    ],
)
def test_login_refuses_bad_tokens(secured: Secured, who: str, status: int, words: str) -> None:
    r = login(secured, who)
    assert r.status_code == status
    assert words in r.text
    assert "tuneplane_session" not in r.headers.get("set-cookie", "")


def test_login_without_csrf_token_is_refused(secured: Secured) -> None:
    r = secured.client.post("/login", data={"token": secured.tokens["admin"]})
    assert r.status_code == 403
    assert "tuneplane_session" not in r.headers.get("set-cookie", "")


@pytest.mark.parametrize(
    "target", ["//evil.example/x", "https://evil.example", "\\\\evil", "/\\evil"]
)
def test_login_never_redirects_off_site(secured: Secured, target: str) -> None:
    r = login(secured, "admin", next_path=target)
    assert r.status_code == 303 and r.headers["location"] == "/"


def test_revoking_a_token_ends_its_sessions(secured: Secured) -> None:
    login(secured, "readwrite")
    assert secured.client.get("/", follow_redirects=False).status_code == 200
    with session_scope(secured.engine) as session:
        revoke_token(session, "readwrite")
    r = secured.client.get("/", follow_redirects=False)
    assert r.status_code == 303 and "why=expired" in r.headers["location"]


def test_forged_and_expired_session_cookies_are_refused(secured: Secured) -> None:
    settings = secured.settings
    value = make_session(settings, "tok_x", now=1_000_000)
    assert read_session(settings, value, now=1_000_001) == "tok_x"
    assert read_session(settings, value, now=1_000_000 + settings.session_hours * 3600 + 1) is None
    body, _, sig = value.rpartition(".")
    assert read_session(settings, body.replace("tok_x", "tok_y") + "." + sig, now=1) is None
    assert read_session(settings, "v1.a.b", now=1) is None
    secured.client.cookies.set("tuneplane_session", value)
    r = secured.client.get("/", follow_redirects=False)
    assert r.status_code == 303 and "why=expired" in r.headers["location"]


def test_every_page_offers_log_out_which_clears_the_session(secured: Secured) -> None:
    login(secured, "read")
    page = secured.client.get("/history")
    form = re.search(
        r'<form class="signed-in" method="post" action="/logout">(.*?)</form>', page.text, re.S
    )
    assert form is not None, page.text[:2000]
    assert ">read</span>" in form.group(1)  # the token's name, never its secret
    assert secured.tokens["read"] not in page.text
    field = re.search(r'name="csrf_token" value="([^"]+)"', form.group(1))
    assert field is not None
    r = secured.client.post("/logout", data={"csrf_token": field.group(1)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?why=logged-out"
    assert secured.client.get("/", follow_redirects=False).status_code == 303


def test_open_mode_offers_no_log_out(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and 'action="/logout"' not in page.text


def test_session_cookie_is_not_secure_on_plain_http_loopback(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(auth_enabled=True)
    engine = make_engine(settings.db_url)
    migrate(engine)
    with session_scope(engine) as session:
        _, secret = create_token(session, TokenCreate(name="me", scopes=["runs:read"]))
    server = LiveServer(create_app(settings)).start()
    try:
        with httpx.Client(base_url=server.url) as client:
            page = client.get("/login")
            field = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
            assert field is not None
            r = client.post("/login", data={"csrf_token": field.group(1), "token": secret})
            assert r.status_code == 303
            assert "secure" not in r.headers["set-cookie"].lower()
            assert client.get("/").status_code == 200  # the browser-like client kept it
    finally:
        server.stop()
        engine.dispose()


# ---- exposure and the CLI --------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"])
def test_loopback_may_serve_open(host: str, settings: Settings) -> None:
    check_exposure(host, settings)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "tuneplane.example.com"])
def test_network_address_needs_auth_or_an_explicit_setting(
    host: str, make_settings: Callable[..., Settings]
) -> None:
    with pytest.raises(ExposureRefused, match="TUNEPLANE_AUTH_ENABLED"):
        check_exposure(host, make_settings())
    check_exposure(host, make_settings(auth_enabled=True))
    check_exposure(host, make_settings(allow_open_network=True))


# The app enforces the same rule itself, whatever serves it (`uvicorn --factory
# api.main:create_app --host 0.0.0.0` never passes through `tuneplane serve`'s check).


def network_address() -> str | None:
    """A non-loopback address of this machine: the one it would send from (a UDP `connect`
    sends nothing); None on a machine with no network at all."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the outgoing interface
        except OSError:
            return None
        host: str = probe.getsockname()[0]
    return None if ipaddress.ip_address(host).is_loopback or host == "0.0.0.0" else host


def assert_refused_for_the_network(response: httpx.Response) -> None:
    assert response.status_code == 403, response.text
    assert response.headers["content-type"] == "application/problem+json"
    detail = response.json()["detail"]
    assert "TUNEPLANE_AUTH_ENABLED" in detail and "TUNEPLANE_ALLOW_OPEN_NETWORK" in detail


def test_an_open_app_served_on_every_address_answers_only_on_loopback(
    settings: Settings, engine: Engine
) -> None:
    host = network_address()
    if host is None:
        pytest.skip("this machine has no non-loopback address (the ASGI test below still runs)")
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="0.0.0.0", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120  # a hang guard: a loaded machine starts slowly
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        with httpx.Client(trust_env=False, timeout=10) as client:
            assert client.get(f"http://127.0.0.1:{port}/api/v1/runs").status_code == 200
            assert_refused_for_the_network(client.get(f"http://{host}:{port}/api/v1/runs"))
            assert_refused_for_the_network(client.get(f"http://{host}:{port}/healthz"))
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def asgi_get(app: FastAPI, server_host: str, path: str = "/api/v1/runs") -> httpx.Response:
    """A request through the real app as an ASGI server that accepted it on `server_host`
    passes it (httpx's ASGITransport puts the URL's host and port in `scope["server"]`)."""

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{server_host}") as c:
            return await c.get(path)

    return asyncio.run(get())


@pytest.mark.parametrize(
    "server_host", ["192.0.2.2", "10.1.2.3", "[2001:db8::1]", "[::ffff:10.0.0.1]"]
)
def test_an_open_app_refuses_requests_that_arrived_on_a_network_address(
    server_host: str, make_settings: Callable[..., Settings], engine: Engine
) -> None:
    assert_refused_for_the_network(asgi_get(create_app(make_settings()), server_host))
    for allowed in ({"auth_enabled": True}, {"allow_open_network": True}):
        response = asgi_get(create_app(make_settings(**allowed)), server_host, "/healthz")
        assert response.status_code == 200, (allowed, response.text)


@pytest.mark.parametrize("server_host", ["127.0.0.1", "127.0.0.2", "[::1]", "[::ffff:127.0.0.1]"])
def test_an_open_app_serves_requests_that_arrived_on_loopback(
    server_host: str, settings: Settings, engine: Engine
) -> None:
    assert asgi_get(create_app(settings), server_host).status_code == 200


def use_settings(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    """Point the CLI's own Settings() at this test's database and data directory."""
    monkeypatch.setenv("TUNEPLANE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("TUNEPLANE_DATABASE_URL", settings.db_url)


def test_serve_refuses_an_open_network_bind(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    use_settings(monkeypatch, settings)
    monkeypatch.delenv("TUNEPLANE_AUTH_ENABLED", raising=False)
    assert cli_main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "refusing to serve on 0.0.0.0" in capsys.readouterr().err


def test_token_cli_create_list_revoke(
    monkeypatch: pytest.MonkeyPatch,
    make_settings: Callable[..., Settings],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    settings = make_settings(auth_enabled=True)
    use_settings(monkeypatch, settings)
    assert cli_main(["token", "create", "--name", "ci", "--scopes", "runs:read,runs:write"]) == 0
    out = capsys.readouterr()
    secret = out.out.strip()
    assert re.fullmatch(r"tp_[A-Za-z0-9_-]{43}", secret)
    assert "only time it is shown" in out.err
    assert cli_main(["token", "create", "--name", "x", "--scopes", "runs:read,superuser"]) == 2
    assert "unknown scope 'superuser'" in capsys.readouterr().err

    engine = make_engine(settings.db_url)
    app = create_app(settings)
    with TestClient(app, base_url="https://testserver") as client:
        ci = {"Authorization": f"Bearer {secret}"}
        assert client.get("/api/v1/runs", headers=ci).status_code == 200
        assert client.get("/api/v1/tokens", headers=ci).status_code == 403
        assert cli_main(["token", "list"]) == 0
        listing = capsys.readouterr().out
        assert "ci" in listing and "runs:read,runs:write" in listing and secret not in listing
        assert cli_main(["token", "revoke", "ci"]) == 0
        assert "revoked" in capsys.readouterr().out
        assert client.get("/api/v1/runs", headers=ci).status_code == 401
        assert cli_main(["token", "revoke", "no-such-token"]) == 2
        assert "no token with id or name" in capsys.readouterr().err
    engine.dispose()
