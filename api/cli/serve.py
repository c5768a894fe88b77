"""`tuneplane serve`: migrate the database, then serve the api (and its worker)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import ipaddress
import logging
import sys
import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI

from api.cli.ports import PortUnavailable, bind
from api.cli.settings import load_settings, open_database, shown_url
from api.dispatch.worker import Worker
from api.main import create_app


class _Server(uvicorn.Server):
    """On the first SIGTERM or Ctrl-C, the app's worker stops first, while the server still
    takes callbacks: its local trainers save a checkpoint and their `segment_done` arrives over
    HTTP (api/dispatch/shutdown.py). Then the server stops as uvicorn's does. A second signal
    stops it at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app
        self._stopping: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        worker = getattr(self.app.state, "worker", None)
        if worker is None or self._stopping is not None:
            super().handle_exit(sig, frame)
            return
        self._stopping = threading.Thread(
            target=self._stop_worker_then_exit, args=(worker, sig, frame), name="stopping"
        )
        self._stopping.daemon = True
        self._stopping.start()

    def _stop_worker_then_exit(self, worker: Worker, sig: int, frame: FrameType | None) -> None:
        try:
            worker.stop()
        finally:
            super().handle_exit(sig, frame)


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
    from api.observability.logs import QuietCallbacks, uvicorn_log_config

    log_config = uvicorn_log_config(settings.log_format, settings.gcp_project)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        log_config=log_config or uvicorn.config.LOGGING_CONFIG,
        access_log=settings.access_log,
    )
    logging.getLogger("uvicorn.access").addFilter(QuietCallbacks())  # after Config's setup
    # Everything built so far (the app, its routes and models, the imported libraries) lives as
    # long as the process: frozen, the garbage collector no longer walks it at every full
    # collection, which a batch of events (thousands of new objects) triggered again and again.
    gc.freeze()
    # And the youngest generation collected every 50,000 new objects, not every 700: a batch
    # of events makes tens of thousands that reference counting frees anyway, and at 700 the
    # collector ran dozens of times a batch (a fifth of its CPU with the collector off, in
    # process). Older generations keep their defaults.
    gc.set_threshold(50_000, 10, 10)
    with sock, contextlib.suppress(KeyboardInterrupt):
        # Ctrl-C (SIGINT) stops the server gracefully, then asyncio re-raises it; uvicorn.run
        # swallows it, Server.run does not, and a traceback on a normal stop is noise (and a
        # non-JSON line in a JSON log).
        _Server(config, app).run(sockets=[sock])
    return 0
