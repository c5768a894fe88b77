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


def settings_errors(exc: ValidationError) -> list[str]:
    """One line per bad setting, named as a person sets it (`TUNEPLANE_MAX_CONCURRENCY='abc':
    Input should be a valid integer, ...`) rather than pydantic's multi-line report."""
    lines = []
    for err in exc.errors(include_url=False):
        message = err["msg"].removeprefix("Value error, ")
        if err["loc"]:
            name = f"TUNEPLANE_{str(err['loc'][0]).upper()}"
            lines.append(f"{name}={str(err['input'])[:100]!r}: {message}")
        else:  # a rule across settings (api/config.py): its message names the variables
            lines.append(message)
    return lines


def load_settings(prog: str, public_url: str | None = None) -> Settings | None:
    """The settings from the environment, Secret Manager references resolved; None once what is
    wrong has been printed. `public_url` replaces the default of TUNEPLANE_PUBLIC_URL when that
    is not set (`serve` knows where it listens; the default names port 8000)."""
    try:
        settings = Settings()
        if public_url is not None and "public_url" not in settings.model_fields_set:
            settings = settings.model_copy(update={"public_url": public_url})
        return resolve_secrets(settings)
    except ValidationError as exc:
        for line in settings_errors(exc):
            print(f"{prog}: {line}", file=sys.stderr)
    except SecretReferenceError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
    return None


def run(args: argparse.Namespace) -> int:
    from api.worker import Worker

    settings = load_settings("tuneplane worker")
    if settings is None:
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
