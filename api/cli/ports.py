"""Binding the listening socket before anything says "serving": `serve` and `demo` check the
port first and, when it cannot be had, say in one line which flag fixes it (exit status 2)."""

from __future__ import annotations

import errno
import socket


class PortUnavailable(Exception):
    """The message names the port and `--port`."""


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (IPv6 when the host is an IPv6 address), for uvicorn's
    `Server.run(sockets=...)`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortUnavailable(
                f"port {port} is already in use (another server?); choose another with --port"
            ) from None
        raise PortUnavailable(
            f"cannot listen on {host}:{port}: {exc.strerror}; check --host and --port"
        ) from None
    sock.listen(2048)
    return sock
