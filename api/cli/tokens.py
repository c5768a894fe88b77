"""`tuneplane token create|list|revoke`: API tokens, managed on the server's own database.

An operator command, like `serve`: it reads the server's settings (`TUNEPLANE_DATABASE_URL`...)
rather than going through the REST api, so the first admin token can be made before any token
exists. The secret is printed once and is stored nowhere.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from pydantic import ValidationError

if TYPE_CHECKING:
    from sqlalchemy import Engine

# The database and the services are imported by the functions that use them, so that
# `tuneplane token --help` answers at once.
PROG = "tuneplane token"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("token", help="API tokens: create (shown once), list, revoke")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    create = verbs.add_parser("create", help="make a token and print it once")
    create.add_argument("--name", required=True, help="who or what uses it, e.g. ci")
    create.add_argument(
        "--scopes",
        required=True,
        help="comma-separated: runs:read, runs:write, admin (admin includes both others)",
    )
    create.add_argument("--expires-in-days", type=float, help="default: until revoked")
    create.set_defaults(func=create_token)
    ls = verbs.add_parser("list", help="every token, revoked ones included (never secrets)")
    ls.set_defaults(func=list_tokens)
    revoke = verbs.add_parser("revoke", help="stop a token working, at once")
    revoke.add_argument("token", help="its id (tok_...) or its name, if only one has it")
    revoke.set_defaults(func=revoke_token)


def _engine() -> Engine | None:
    """The server's database, migrated; None once what is wrong (a setting, the database) has
    been printed. TUNEPLANE_DATABASE_URL may be an sm:// reference."""
    from api.cli.settings import load_settings, open_database

    settings = load_settings(PROG)
    return None if settings is None else open_database(PROG, settings)


def create_token(args: argparse.Namespace) -> int:
    from api.auth import tokens as service
    from api.auth.models import TokenCreate
    from api.db import session_scope
    from api.errors import Problem

    try:
        body = TokenCreate(
            name=args.name,
            scopes=[s for s in args.scopes.split(",") if s.strip()],
            expires_in_days=args.expires_in_days,
        )
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            print(
                f"{PROG}: --{'-'.join(map(str, err['loc']))}: {err['msg']}",
                file=sys.stderr,
            )
        return 2
    engine = _engine()
    if engine is None:
        return 2
    try:
        with session_scope(engine) as session:
            token, secret = service.create_token(session, body, created_by="cli")
    except Problem as exc:
        print(f"{PROG}: {exc.detail}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    print(secret)
    print(
        f"token {token.id} ({token.name}; {', '.join(token.scopes)}) created. This is the only "
        "time it is shown: store it now (e.g. as the CI secret TUNEPLANE_TOKEN).",
        file=sys.stderr,
    )
    return 0


def list_tokens(args: argparse.Namespace) -> int:
    from api.auth import tokens as service
    from api.db import session_scope

    engine = _engine()
    if engine is None:
        return 2
    try:
        with session_scope(engine) as session:
            tokens = service.list_tokens(session)
    finally:
        engine.dispose()
    if not tokens:
        print("no tokens (make one: tuneplane token create --name NAME --scopes SCOPES)")
        return 0
    print(f"{'ID':<26} {'NAME':<20} {'HINT':<8} {'SCOPES':<30} {'LAST USED':<17} STATE")
    for t in tokens:
        used = f"{t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "never"
        state = (
            f"revoked {t.revoked_at:%Y-%m-%d}"
            if t.revoked_at
            else (f"expires {t.expires_at:%Y-%m-%d}" if t.expires_at else "active")
        )
        print(
            f"{t.id:<26} {t.name[:20]:<20} {t.hint:<8} {','.join(t.scopes):<30} {used:<17} {state}"
        )
    return 0


def revoke_token(args: argparse.Namespace) -> int:
    from api.auth import tokens as service
    from api.db import session_scope
    from api.errors import Problem

    engine = _engine()
    if engine is None:
        return 2
    try:
        with session_scope(engine) as session:
            token = service.revoke_token(session, args.token)
    except Problem as exc:
        print(f"{PROG}: {exc.detail}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    print(f"token {token.id} ({token.name}) revoked at {token.revoked_at:%Y-%m-%d %H:%M} UTC")
    return 0
