"""The `tuneplane` command. Each subcommand lives in a module of its own with a `register`
function that adds its parser; `main` only wires them together."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# One line per subcommand module; each defines `register(subparsers)`.
COMMANDS = ["serve", "tokens", "retrain", "runs", "worker", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneplane",
        description="Fine-tuning runs of vision-language models on serverless GPUs",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"api.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
