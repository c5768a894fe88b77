"""`tuneplane serve`: migrate the database, then serve the api (and its worker)."""

from __future__ import annotations

import argparse
import ipaddress
import sys

import uvicorn

from api.cli.ports import PortUnavailable, bind
from api.cli.settings import load_settings, open_database, shown_url
from api.main import create_app


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the api server (migrates the database first)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=run)


def local_url(host: str, port: int) -> str:
    """The URL at which a process on this machine reaches a server bound to `host`:`port`; a
    wildcard bind (0.0.0.0, ::) is reached at loopback."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}"  # a host name
    if ip.is_unspecified:
        ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    return f"http://[{ip}]:{port}" if ip.version == 6 else f"http://{ip}:{port}"


def run(args: argparse.Namespace) -> int:
    # Without TUNEPLANE_PUBLIC_URL, local trainers call back where this server listens, not
    # at the default's port 8000.
    settings = load_settings("tuneplane", public_url=local_url(args.host, args.port))
    if settings is None:
        return 2
    from api.auth.network_guard import ExposureRefused, check_exposure

    try:
        check_exposure(args.host, settings)  # no open api on a network (api/auth/network_guard.py)
    except ExposureRefused as exc:
        print(f"tuneplane: {exc}", file=sys.stderr)
        return 2
    engine = open_database("tuneplane", settings)
    if engine is None:
        return 2
    engine.dispose()
    # The port before "serving on": one line naming --port, not uvicorn's traceback after it.
    try:
        sock = bind(args.host, args.port)
    except PortUnavailable as exc:
        print(f"tuneplane: {exc}", file=sys.stderr)
        return 2
    print(
        f"tuneplane: serving on http://{args.host}:{args.port} (database "
        f"{shown_url(settings.db_url)}; trainers call back at {settings.public_url})",
        flush=True,
    )
    config = uvicorn.Config(create_app(settings), host=args.host, port=args.port, log_level="info")
    with sock:
        uvicorn.Server(config).run(sockets=[sock])
    return 0
