"""Settings and the database for the commands that run the server side (`serve`, `worker`,
`token`): what is wrong is printed as one line each, never as a traceback, and the command
exits 2. A person starting tuneplane should read which variable to fix, not pydantic's or
SQLAlchemy's internals."""

from __future__ import annotations

import sys

from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from api.config import Settings
from api.db import make_engine, migrate
from api.secrets import SecretReferenceError, resolve_secrets


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


def shown_url(url: str) -> str:
    """The database URL with its password hidden, for messages."""
    return make_url(url).render_as_string(hide_password=True)


def open_database(prog: str, settings: Settings) -> Engine | None:
    """An engine on the database, migrated to the newest schema; None once why it cannot be
    opened (a malformed URL, a server out of reach, a refused login) has been printed."""
    try:
        shown = shown_url(settings.db_url)
    except ArgumentError:  # the URL itself is never printed: it may hold a password
        print(
            f"{prog}: TUNEPLANE_DATABASE_URL is not a database URL (e.g. "
            "postgresql://user:password@host/db or sqlite:////abs/path/tuneplane.db)",
            file=sys.stderr,
        )
        return None
    try:
        engine = make_engine(settings.db_url)
        migrate(engine)
    except (ArgumentError, ImportError) as exc:  # a dialect or driver that is not installed
        print(
            f"{prog}: cannot open the database {shown}: {exc}; tuneplane runs on "
            "postgresql:// and sqlite:// URLs",
            file=sys.stderr,
        )
        return None
    except (DBAPIError, OSError) as exc:  # out of reach, login refused, a directory it can't make
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"{prog}: cannot open the database {shown}: {reason}", file=sys.stderr)
        return None
    return engine
