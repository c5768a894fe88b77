"""README.md stays true: its configuration tables match the settings classes both ways, its
Quickstart is two commands, CI installs what it says, its API table lists exactly the app's
/api/v1 routes, and its curl examples run against a real server."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic_settings import BaseSettings
from sqlalchemy import Engine
from sqlmodel import select

from api.config import ClientSettings, Settings
from api.db import session_scope
from api.main import create_app
from api.runs.models import Run
from tests.conftest import LiveServer

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
EXAMPLE_URL = "http://127.0.0.1:8000"
ROW = re.compile(r"^\| `(TUNEPLANE_[A-Z0-9_]+)` \| `([^`]*)` \| (.*?) \|$")
ROUTE_ROW = re.compile(r"^\| `(GET|POST|PUT|PATCH|DELETE) (/api/v1/[^`]*)` \|", re.M)
PATH_PARAM = re.compile(r"\{[^}]+\}")


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def tables(text: str) -> list[dict[str, tuple[str, str]]]:
    """Each markdown table of settings in `text`: {variable: (default, description)}."""
    out: list[dict[str, tuple[str, str]]] = []
    current: dict[str, tuple[str, str]] | None = None
    for line in text.splitlines():
        match = ROW.match(line)
        if match:
            if current is None:
                current = {}
                out.append(current)
            name, default, description = match.groups()
            assert name not in current, f"{name} is in the table twice"
            current[name] = (default, description.strip())
        elif not line.startswith("|"):
            current = None
    return out


def shown_default(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def row(name: str, field: Any) -> str:
    return (
        f"| `TUNEPLANE_{name.upper()}` | `{shown_default(field.default)}` | {field.description} |"
    )


@pytest.mark.parametrize(("index", "cls"), [(0, Settings), (1, ClientSettings)])
def test_configuration_tables_match_the_settings(index: int, cls: type[BaseSettings]) -> None:
    table = tables(section("Configuration"))[index]
    fields = cls.model_fields
    expected = {f"TUNEPLANE_{name.upper()}": name for name in fields}
    missing = [row(n, fields[n]) for env, n in expected.items() if env not in table]
    assert not missing, "README's table lacks (rows to paste):\n" + "\n".join(missing)
    unknown = sorted(set(table) - set(expected))
    assert not unknown, f"README documents settings that {cls.__name__} does not have: {unknown}"
    for env, name in expected.items():
        default, description = table[env]
        assert default == shown_default(fields[name].default), f"{env}: default"
        assert description, f"{env} has no description"


def test_settings_read_the_variables_the_table_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEPLANE_MAX_CONCURRENCY", "7")
    monkeypatch.setenv("TUNEPLANE_DEFAULT_GPU_TYPE", "nvidia-rtx-pro-6000")
    settings = Settings()
    assert settings.max_concurrency == 7
    assert settings.default_gpu_type == "nvidia-rtx-pro-6000"


def test_quickstart_is_two_commands_in_one_block() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", section("Quickstart"), re.S)
    assert len(blocks) == 1
    commands = [line for line in blocks[0].splitlines() if line.strip()]
    assert len(commands) == 2
    assert commands[0].startswith("python3 -m venv .venv && .venv/bin/pip install -e")
    assert commands[1] == "bash .ci/run"


def test_ci_installs_and_tests_exactly_as_the_readme_says() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    dev = re.findall(r"```bash\n(.*?)```", section("Development and tests"), re.S)[0]
    install, test = (line.strip() for line in dev.strip().splitlines())
    assert install == "python3 -m venv .venv && .venv/bin/pip install -e '.[dev,trainer]'"
    assert (
        "python3 -m venv .venv" in ci and ".venv/bin/pip install --quiet -e '.[dev,trainer]'" in ci
    )
    assert test == "bash .ci/test" and "bash .ci/test" in ci
    assert "uv " not in ci and "pytest -n 2 --db all" in (ROOT / ".ci" / "test").read_text()


def test_api_table_lists_every_api_route(tmp_path: Path) -> None:
    """Every operation under /api/v1 in the app's OpenAPI document is a row of the README's
    table, and every row is a real operation (parameter names may differ: `{id}`, `{run_id}`)."""
    app = create_app(Settings(data_dir=tmp_path, run_worker=False))
    routes = {
        (method.upper(), PATH_PARAM.sub("{}", path))
        for path, operations in app.openapi()["paths"].items()
        if path.startswith("/api/v1/")
        for method in operations
    }
    documented = [
        (method, PATH_PARAM.sub("{}", path))
        for method, path in ROUTE_ROW.findall(section("API overview"))
    ]
    assert len(documented) == len(set(documented)), "a route is in the README's table twice"
    missing = sorted(routes - set(documented))
    assert not missing, f"README's API table lacks: {missing}"
    unknown = sorted(set(documented) - routes)
    assert not unknown, f"README's API table names routes the app does not have: {unknown}"


def api_examples() -> list[str]:
    text = section("API overview")
    blocks = re.findall(r"(<!-- readme-test -->\n)?```bash\n(.*?)```", text, re.S)
    untested = [code for marker, code in blocks if not marker]
    assert not untested, f"curl examples without a <!-- readme-test --> marker: {untested}"
    return [code for _, code in blocks]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_api_examples_run_against_a_live_server(
    live_server: LiveServer, engine: Engine, tmp_path: Path
) -> None:
    examples = api_examples()
    assert len(examples) >= 5
    script = "set -euo pipefail\n" + "\n".join(examples)
    script = script.replace(EXAMPLE_URL, live_server.url)
    assert EXAMPLE_URL not in script
    out = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PATH": os.environ.get("PATH", "")},
        check=False,
    )
    assert out.returncode == 0, f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    assert "\n200\n" in out.stdout  # the idempotent replay
    assert '"title":"Run does not fit the GPU"' in out.stdout
    with session_scope(engine) as s:
        runs = {r.id: r for r in s.exec(select(Run))}
    # One submitted (the replay made nothing), one retrain of it; the original was cancelled.
    assert len(runs) == 2
    [parent] = [r for r in runs.values() if r.parent_id is None]
    [child] = [r for r in runs.values() if r.parent_id == parent.id]
    assert parent.name == "pets-4b" and parent.status == "cancelled"
    assert child.status == "queued" and child.spec["train_size"] == 2500
