"""Webhooks may not reach internal services: loopback, private, link-local (the cloud metadata
server at 169.254.169.254), or any other non-global address.

Anyone who may write a template chooses its webhook URLs, and the api posts to them from inside
the network, so without this a template is a way to make the api post to (and, before, read the
answer of) whatever the api can reach. Checked twice:

- at template creation (`refuse_internal`): a URL whose host is, or resolves to, a forbidden
  address is a 422 naming it; a name that does not resolve now is accepted (DNS may change, and
  it is checked again at delivery);
- at delivery, on the address the connection is actually made to (`GuardedBackend`, the network
  backend of the notifier's httpx transport): the name is resolved once, every address checked,
  and the socket connected to that checked address, so a name that resolved to a public address
  at creation and to 127.0.0.1 now (DNS rebinding) is refused. TLS still verifies the URL's name
  (httpcore sends the origin's host as SNI and checks the certificate against it).

Numeric spellings (`2130706433`, `0x7f000001`, `0177.1`) are what `getaddrinfo` reads them as;
IPv4-mapped IPv6 (`::ffff:127.0.0.1`) is judged by its IPv4 address. Networks listed in
`TUNEPLANE_WEBHOOK_ALLOWED_NETWORKS` (e.g. a receiver on your own VPC, or 127.0.0.0/8 in tests)
are allowed; by default none are.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpcore

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Names of metadata servers and internal zones that need no lookup to be refused: they resolve
# only inside a cloud network, where they are exactly what must not be reached.
_INTERNAL_NAMES = ("metadata", "metadata.google.internal", "metadata.goog", "localhost")
_INTERNAL_SUFFIXES = (".internal", ".localhost", ".local")


_REFUSED = "which webhooks may not reach"


def is_refusal(message: str) -> bool:
    return _REFUSED in message


class InternalAddress(Exception):
    """The webhook's host is, or resolves to, an address webhooks may not reach."""


def networks(allowed: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in allowed)


def _kind(ip: IPAddress) -> str | None:
    """Why `ip` is not a public address, or None if it is."""
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local (cloud metadata)"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "reserved"
    return None


def check_address(address: str, allowed: Sequence[Network]) -> None:
    ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip.version == net.version and ip in net for net in allowed):
        return
    kind = _kind(ip)
    if kind is not None:
        raise InternalAddress(f"{ip} is a {kind} address, {_REFUSED}")


def _check_name(host: str) -> None:
    name = host.strip("[]").rstrip(".").lower()
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        if name in _INTERNAL_NAMES or name.endswith(_INTERNAL_SUFFIXES):
            raise InternalAddress(f"{host} names an internal service, {_REFUSED}") from None


def resolve_checked(host: str, port: int, allowed: Sequence[Network]) -> list[str]:
    """Every address `host` resolves to, each checked; raises InternalAddress if one is
    forbidden (all of them, not only the first: the connection may use any)."""
    _check_name(host)
    infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        check_address(address, allowed)
    return addresses


def refuse_internal(url: str, allowed: Iterable[str]) -> str | None:
    """At template creation: why `url` may not be a webhook, or None. A name that does not
    resolve here and now passes (it is checked again, on the connected address, at delivery)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        resolve_checked(host, parts.port or 443, networks(allowed))
    except InternalAddress as exc:
        return str(exc)
    except (OSError, UnicodeError, ValueError):
        return None
    return None


class GuardedBackend(httpcore.SyncBackend):
    """httpcore's socket backend, connecting only to checked addresses."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = networks(allowed)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = resolve_checked(host, port, self.allowed)
        except InternalAddress as exc:
            raise httpcore.ConnectError(str(exc)) from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        error: Exception | None = None
        for address in addresses:  # the checked addresses, never the name again
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                error = exc
        raise error or httpcore.ConnectError(f"{host} has no address")


def guarded_transport(allowed: Iterable[str]) -> Any:
    """An httpx transport whose every connection goes through `GuardedBackend`."""
    import httpx

    transport = httpx.HTTPTransport()
    # httpx builds the pool itself and offers no argument for its network backend; the pool's
    # `_network_backend` is httpcore's documented extension point (httpcore.ConnectionPool's
    # `network_backend` parameter), set here after construction.
    transport._pool._network_backend = GuardedBackend(allowed)
    return transport
