"""The `tuneplane` dispatcher: it imports only the chosen subcommand's module, and its table of
commands says what each module registers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import api
from api.cli import COMMANDS, build_parser, chosen_command, main

REPO = Path(api.__file__).resolve().parent.parent
SERVER_STACK = ("fastapi", "starlette", "sqlalchemy", "sqlmodel", "alembic", "uvicorn", "jinja2")

# A fresh interpreter, as the console script starts: this test process has imported everything.
SCRIPT = """
import json, sys
from api.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def tuneplane(*args: str) -> tuple[int, str, set[str]]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    *printed, last = out.stdout.strip().splitlines()
    result = json.loads(last)
    return result["code"], "\n".join(printed), set(result["modules"])


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["retrain", "--help"], ["runs", "--help"], ["runs", "show", "--help"]],
)
def test_client_commands_do_not_load_the_server_stack(argv: list[str]) -> None:
    # `retrain` and `runs` are HTTP clients (api/cli/http.py): CI jobs start them often, and
    # they have no use for the web framework or the database layer.
    code, printed, modules = tuneplane(*argv)
    assert code == 0
    assert "usage: tuneplane" in printed
    assert sorted(modules & set(SERVER_STACK)) == []


def test_a_server_command_still_loads_what_it_needs() -> None:
    # The check above can see these modules: `serve` imports them (api.main, uvicorn).
    code, printed, modules = tuneplane("serve", "--help")
    assert code == 0 and "--port" in printed
    assert {"fastapi", "sqlalchemy", "uvicorn"} <= modules


def test_top_level_help_lists_every_command_with_its_help() -> None:
    code, printed, _ = tuneplane("--help")
    assert code == 0
    for name in COMMANDS:
        assert f"\n    {name} " in printed
    assert "list runs or show one (over the REST api)" in printed


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_table_matches_what_each_module_registers(name: str) -> None:
    # build_parser(name) adds no stub for `name`: its entry is the one the module's `register`
    # adds, and the listing must read exactly as from the table alone (names, order, help).
    assert build_parser(name).format_help() == build_parser().format_help()


def test_chosen_command_is_the_first_word_that_is_not_an_option() -> None:
    assert chosen_command(["runs", "list", "--status", "failed"]) == "runs"
    assert chosen_command(["-h"]) is None
    assert chosen_command([]) is None


def test_an_unknown_command_names_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["retrian", "tiny"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'retrian'" in err and "retrain" in err
