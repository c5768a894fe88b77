"""The api image ships without torch: importing any `api` module must not pull it in, and of the
trainer package the api imports the contract alone (docs/architecture.md, "The contract")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import api

HEAVY = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "sklearn")

SCRIPT = """
import importlib, json, pkgutil, sys
import api
# __main__ modules run the command line when imported; they import api.cli, covered here.
names = sorted(
    m.name for m in pkgutil.walk_packages(api.__path__, "api.") if not m.name.endswith("__main__")
)
for name in names:
    importlib.import_module(name)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
trainer = sorted(m for m in sys.modules if m.split(".")[0] == "trainer")
print(json.dumps({"modules": names, "heavy": heavy, "trainer": trainer}))
"""


def test_no_api_module_imports_the_trainer_stack() -> None:
    # A fresh interpreter: this test process may have imported torch for other tests.
    out = subprocess.run(
        [sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{SCRIPT}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(api.__file__).parent.parent,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "api.main" in result["modules"] and "api.runs.routes" in result["modules"]
    assert len(result["modules"]) > 20
    assert result["heavy"] == []
    outside_contract = [
        m for m in result["trainer"] if m != "trainer" and not m.startswith("trainer.contract")
    ]
    assert outside_contract == []
    assert "trainer.contract.spec" in result["trainer"]
