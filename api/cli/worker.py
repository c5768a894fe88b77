"""`tuneplane worker`: the dispatch worker alone, for api replicas started with
`TUNEPLANE_RUN_WORKER=false` (any number of workers may share one PostgreSQL database)."""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType

from api.cli.settings import load_settings, open_database, shown_url


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "worker",
        help="run the dispatch worker alone (it starts queued runs and watches their executions)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from api.dispatch.worker import Worker

    settings = load_settings("tuneplane worker")
    if settings is None:
        return 2
    if settings.log_format == "json":
        import logging.config

        from api.observability.logs import uvicorn_log_config

        logging.config.dictConfig(uvicorn_log_config("json", settings.gcp_project) or {})
    engine = open_database("tuneplane worker", settings)
    if engine is None:
        return 2
    try:
        worker = Worker(settings, engine)
    except ValueError as exc:
        print(f"tuneplane worker: {exc}", file=sys.stderr)
        return 2

    def _stop(signum: int, frame: FrameType | None) -> None:
        worker.request_stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(
        f"tuneplane worker {worker.worker_id}: {settings.dispatcher} dispatcher, database "
        f"{shown_url(settings.db_url)}, up to {settings.max_concurrency} active runs "
        "(Ctrl-C stops it)",
        flush=True,
    )
    from api.notify.service import Notifier

    notifier = Notifier(settings, engine)  # webhooks of finished runs go out from here too
    notifier.start()
    worker.run_forever()
    worker.stop()
    notifier.stop()
    engine.dispose()
    return 0
