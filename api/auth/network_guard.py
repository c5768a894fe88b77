"""An open api (auth off) answers only requests that arrived on a loopback address.

`tuneplane serve` refuses to bind anything else with auth off (`check_exposure`, below), but the
app can be served without it (`uvicorn --factory api.main:create_app --host 0.0.0.0`, a process
manager, a container's own command). So the app checks too, per request: the ASGI `server` of a
request is the local address its connection arrived on, which for a server bound to every address
tells loopback from the network. Anything else gets a 403 that says what to set.

Only an IP address counts as "the network": servers report the socket's numeric address, while a
name in `server` (a Unix socket's path, an in-process test client's `testserver`) is no network
interface. Not installed at all when auth is on or `allow_open_network` says a proxy in front
authenticates every request.
"""

from __future__ import annotations

import ipaddress
import logging

from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api.config import Settings
from api.errors import problem_response

log = logging.getLogger("tuneplane.api")


def arrived_on_network(server: object) -> str | None:
    """The non-loopback IP address in an ASGI `server` (host, port), or None."""
    if not isinstance(server, tuple | list) or not server or not isinstance(server[0], str):
        return None
    try:
        address = ipaddress.ip_address(server[0].strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # `::ffff:127.0.0.1` on a dual-stack socket
    return None if address.is_loopback else str(address)


class OpenNetworkGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._warned = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = arrived_on_network(scope.get("server")) if scope["type"] != "lifespan" else None
        if host is None:
            await self.app(scope, receive, send)
            return
        if not self._warned:
            self._warned = True
            log.warning("authentication is off: refusing requests that arrive on %s", host)
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        detail = (
            f"this request arrived on {host}, and this api runs with authentication off, which "
            "is safe on loopback only. Turn authentication on (TUNEPLANE_AUTH_ENABLED=true), or, "
            "if a proxy in front of tuneplane authenticates every request, set "
            "TUNEPLANE_ALLOW_OPEN_NETWORK=true"
        )
        response = problem_response(Request(scope), 403, "Forbidden", detail)
        await response(scope, receive, send)


def install(app: FastAPI, settings: Settings) -> None:
    if not (settings.auth_enabled or settings.allow_open_network):
        app.add_middleware(OpenNetworkGuard)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


class ExposureRefused(RuntimeError):
    pass


def check_exposure(host: str, settings: Settings) -> None:
    """Refuse to serve an open api (auth off) on anything but loopback, unless the operator said
    explicitly that something in front of it authenticates (`allow_open_network`)."""
    if settings.auth_enabled or settings.allow_open_network or is_loopback(host):
        return
    raise ExposureRefused(
        f"refusing to serve on {host} with authentication off: anyone who can reach this "
        "address could start and cancel runs. Turn it on (TUNEPLANE_AUTH_ENABLED=true, then make "
        "an admin token with `tuneplane token create --name admin --scopes admin`), bind to "
        "127.0.0.1, or, if a proxy in front of tuneplane authenticates every request, set "
        "TUNEPLANE_ALLOW_OPEN_NETWORK=true"
    )
