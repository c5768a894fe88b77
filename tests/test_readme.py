"""README.md stays true: its configuration tables match the settings classes both ways, its
Quickstart is two commands, CI installs what it says, its API table lists exactly the app's
/api/v1 routes, its constraints file pins the trainer's stack, and every shell block runs as
written against a fresh `tuneplane serve` (or says why not and what tests it instead)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic_settings import BaseSettings
from sqlmodel import select

from api.auth.models import ApiToken
from api.config import ClientSettings, Settings
from api.db import make_engine, session_scope
from api.main import create_app
from api.runs.models import Run
from api.templates.models import RunTemplate
from tests.conftest import free_port

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
    pins = "-c trainer/constraints.txt"
    assert install == f"python3 -m venv .venv && .venv/bin/pip install -e '.[dev,trainer]' {pins}"
    assert (
        "python3 -m venv .venv" in ci
        and f".venv/bin/pip install --quiet -e '.[dev,trainer]' {pins}" in ci
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


SHELL_BLOCK = re.compile(
    r"(?:^<!-- (?P<marker>[^\n]*?) -->\n)?^```(?:bash|sh|shell)\n(?P<code>.*?)^```", re.M | re.S
)
NOT_RUN = re.compile(r"^not run: (?P<why>[^;]+); (?P<how>.+)$")
TESTED_BY = re.compile(r"(?:tests/[\w/]+\.py|\.ci/run)")


def shell_blocks() -> list[tuple[str | None, str]]:
    """Every bash block of README.md in order, with the comment line above it, if any."""
    return [(m["marker"], m["code"]) for m in SHELL_BLOCK.finditer(README)]


def test_every_shell_block_not_run_says_why_and_what_tests_it() -> None:
    blocks = shell_blocks()
    assert len(blocks) >= 12
    for marker, code in blocks:
        if marker is None:
            continue
        match = NOT_RUN.match(marker)
        assert match, f"a comment above a shell block must be 'not run: WHY; HOW': {marker!r}"
        named = TESTED_BY.findall(match["how"])
        assert named, f"'not run' must name the test that covers it instead: {marker!r}"
        for path in named:
            assert (ROOT / path).exists(), f"{marker!r} names {path}, which does not exist"
        assert code.strip()


def test_the_trainer_stack_is_pinned_and_installed_at_its_pins() -> None:
    """One constraints file for the trainer's stack, used by every install; the versions
    installed here are the pinned ones, so the figures README quotes are this stack's."""
    pins = dict(
        line.split("==")
        for line in (ROOT / "trainer" / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for name in ("torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate",
                 "tokenizers"):  # fmt: skip
        assert name in pins, f"trainer/constraints.txt does not pin {name}"
    for name, pinned in pins.items():
        installed = importlib.metadata.version(name).split("+")[0]  # 2.14.1+cu128 is 2.14.1
        assert installed == pinned, f"{name} {installed} is installed, constraints say {pinned}"
    uses = "-c trainer/constraints.txt"
    assert uses in (ROOT / ".ci" / "run").read_text()
    assert section("Quickstart").count(uses) == section("Development and tests").count(uses) == 1
    docker = (ROOT / "Dockerfile.trainer").read_text()
    installs = [line for line in docker.splitlines() if "pip install" in line]
    assert installs and all(uses in line for line in installs), installs


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 120  # a guard against a hang only
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, (
            "tuneplane serve never became ready:\n" + log.read_text()
        )
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_every_shell_block_runs_in_order_against_a_fresh_serve(tmp_path: Path) -> None:
    """Every block not marked `not run` runs as written, one bash script in order (a variable
    set in one block is there in the next), against `tuneplane serve` on a fresh data directory
    and a free port; the README's `127.0.0.1:8000` and `/tmp/` become those of this test. The
    dispatch worker is off (TUNEPLANE_RUN_WORKER=false): runs stay queued, so what each block
    answers never depends on how fast a trainer is (a cancel cannot race the run's end)."""
    port, data, work = free_port(), tmp_path / "data", tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")  # the blocks say .venv/bin/python
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEPLANE_")}
    env.update(
        TUNEPLANE_DATA_DIR=str(data),  # serve's, and `tuneplane token`'s (the same database)
        TUNEPLANE_RUN_WORKER="false",
        # What the README says to serve the examples with, its /tmp/ made this test's.
        TUNEPLANE_LOCAL_DATA_ROOTS=json.dumps([f"{tmp_path}/tmp/tiny-gemma3"]),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        OMP_NUM_THREADS="1",
    )
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "api", "serve", "--port", str(port)],
            env=env, cwd=work, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _wait_ready(serve, url, log)
        blocks = [code for marker, code in shell_blocks() if marker is None]
        script = "set -euo pipefail\n" + "\n".join(blocks)
        script = script.replace(EXAMPLE_URL, url).replace("/tmp/", f"{tmp_path}/tmp/")
        (tmp_path / "tmp").mkdir()
        done = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, timeout=1200, cwd=work,
            env=env, check=False,
        )  # fmt: skip
    finally:
        serve.send_signal(signal.SIGINT)
        serve.wait(timeout=60)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    _check_what_the_blocks_did(done.stdout, data, tmp_path / "tmp")


def _check_what_the_blocks_did(out: str, data: Path, tmp: Path) -> None:
    assert "\n200\n" in out  # the idempotent replay
    assert '"title":"Run does not fit the GPU"' in out
    engine = make_engine(f"sqlite:///{data / 'tuneplane.db'}")
    with session_scope(engine) as s:
        runs = {r.id: r for r in s.exec(select(Run))}
        # One submitted (the replay made nothing), one retrain of it; the original cancelled.
        [parent] = [r for r in runs.values() if r.parent_id is None]
        [child] = [r for r in runs.values() if r.parent_id == parent.id]
        assert parent.name == "digits-tiny" and parent.status == "cancelled"
        assert child.status == "queued" and child.spec["learning_rate"] == 1e-3
        assert parent.spec["model_id"] == str(tmp / "tiny-gemma3")
        templates = {t.name for t in s.exec(select(RunTemplate))}
        assert {"pets-gemma3-4b", "digits-tiny"} <= templates
        tokens = {t.name: t.revoked_at for t in s.exec(select(ApiToken))}
        assert set(tokens) == {"admin", "ci", "old"} and tokens["old"] is not None
    engine.dispose()
    # The trainer by hand: README's figure, reproduced (trainer/constraints.txt's versions).
    results = json.loads((tmp / "tiny-out" / "results.json").read_text())
    quoted = re.search(
        r"reached the same ([\d.]+) accuracy", section("Running the trainer by hand")
    )
    assert quoted, "README's trainer-by-hand figure moved"
    # To within 0.05, not to the last digit: the CPU's float kernels decide those
    # (tests/test_demo.py says more).
    assert abs(results["final"]["accuracy"] - float(quoted[1])) <= 0.05
    assert len((tmp / "tiny-out" / "events.jsonl").read_text().splitlines()) > 10
