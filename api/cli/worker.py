"""`tuneplane worker`: the dispatch worker alone, for api replicas started with
`TUNEPLANE_RUN_WORKER=false` (any number of workers may share one PostgreSQL database)."""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType

from pydantic import ValidationError
from sqlalchemy.engine import make_url

from api.config import Settings
from api.db import make_engine, migrate
from api.secrets import SecretReferenceError, resolve_secrets


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "worker",
        help="run the dispatch worker alone (it starts queued runs and watches their executions)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from api.worker import Worker

    try:
        settings = resolve_secrets(Settings())
    except (ValidationError, SecretReferenceError) as exc:
        print(f"tuneplane worker: invalid settings: {exc}", file=sys.stderr)
        return 2
    engine = make_engine(settings.db_url)
    migrate(engine)
    try:
        worker = Worker(settings, engine)
    except ValueError as exc:
        print(f"tuneplane worker: {exc}", file=sys.stderr)
        return 2

    def _stop(signum: int, frame: FrameType | None) -> None:
        worker.request_stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    database = make_url(settings.db_url).render_as_string(hide_password=True)
    print(
        f"tuneplane worker {worker.worker_id}: {settings.dispatcher} dispatcher, database "
        f"{database}, up to {settings.max_concurrency} active runs (Ctrl-C stops it)",
        flush=True,
    )
    from api.notify import Notifier

    notifier = Notifier(settings, engine)  # webhooks of finished runs go out from here too
    notifier.start()
    worker.run_forever()
    worker.stop()
    notifier.stop()
    engine.dispose()
    return 0
