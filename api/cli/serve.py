"""`tuneplane serve`: migrate the database, then serve the api (and its worker)."""

from __future__ import annotations

import argparse
import sys

import uvicorn

from api.config import Settings
from api.db import make_engine, migrate
from api.main import create_app
from api.secrets import SecretReferenceError, resolve_secrets


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the api server (migrates the database first)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        settings = resolve_secrets(Settings())
    except SecretReferenceError as exc:
        print(f"tuneplane: {exc}", file=sys.stderr)
        return 2
    from api.auth import ExposureRefused, check_exposure

    try:
        check_exposure(args.host, settings)  # no open api on a network (api/auth.py)
    except ExposureRefused as exc:
        print(f"tuneplane: {exc}", file=sys.stderr)
        return 2
    engine = make_engine(settings.db_url)
    migrate(engine)
    engine.dispose()
    print(f"tuneplane: serving on http://{args.host}:{args.port} (database {settings.db_url})")
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    return 0
