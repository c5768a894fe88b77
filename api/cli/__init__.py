"""The `tuneplane` command. Each subcommand lives in a module of its own with a `register`
function that adds its parser; `main` only wires them together.

Only the chosen subcommand's module is imported: the server commands pull in fastapi, SQLAlchemy
and uvicorn (about a second), which the thin HTTP clients (`retrain`, `runs`) that CI jobs run
never need. The others are listed from `COMMANDS` alone, so `tuneplane --help` imports none."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple


class Command(NamedTuple):
    module: str  # defines `register(subparsers)`, which adds the parser of this name
    help: str  # the line in `tuneplane --help`; tests/api/cli/test_tuneplane_cli.py checks it


COMMANDS: dict[str, Command] = {
    "serve": Command("api.cli.serve", "run the api server (migrates the database first)"),
    "token": Command("api.cli.tokens", "API tokens: create (shown once), list, revoke"),
    "retrain": Command(
        "api.cli.retrain",
        "start a run of a template (for CI: --wait turns its outcome into the exit status)",
    ),
    "runs": Command("api.cli.runs", "list runs or show one (over the REST api)"),
    "worker": Command(
        "api.cli.worker",
        "run the dispatch worker alone (it starts queued runs and watches their executions)",
    ),
    "demo": Command(
        "api.cli.demo",
        "run the whole loop locally: api + worker + a tiny model fine-tuned on digits",
    ),
}


def chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand argv names: its first word that is not an option, since the top-level
    parser has no options that take a value (only -h). None for `tuneplane`, `tuneplane -h`."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser of `command` (its module imported), and a one-line stub for each other
    subcommand: enough to list them in --help and to name the choices when argv has a typo."""
    parser = argparse.ArgumentParser(
        prog="tuneplane",
        description="Fine-tuning runs of vision-language models on serverless GPUs",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, spec in COMMANDS.items():
        if name == command:
            importlib.import_module(spec.module).register(sub)
        else:
            sub.add_parser(name, help=spec.help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(chosen_command(argv)).parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
