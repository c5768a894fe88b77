"""The contract package imports nothing heavier than pydantic, so the api can depend on it without
the trainer's stack (docs/architecture.md, "The contract")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trainer

SCRIPT = """
import importlib, json, pkgutil, sys
before = set(sys.modules)  # what the interpreter itself loaded at start-up
import trainer.contract as contract
names = sorted(m.name for m in pkgutil.walk_packages(contract.__path__, "trainer.contract."))
for name in names:
    importlib.import_module(name)
top = sorted({m.split(".")[0] for m in set(sys.modules) - before})
ours = sorted(m for m in sys.modules if m.split(".")[0] == "trainer")
print(json.dumps({"modules": names, "top": top, "ours": ours}))
"""

# What a contract module may pull in beyond the standard library.
ALLOWED_THIRD_PARTY = {
    "pydantic",
    "pydantic_core",
    "annotated_types",
    "typing_extensions",
    "typing_inspection",
}


def test_the_contract_imports_only_pydantic_and_itself() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(trainer.__file__).parent.parent,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {
        "trainer.contract.spec",
        "trainer.contract.events",
        "trainer.contract.execution",
        "trainer.contract.spool",
    } <= set(result["modules"])
    assert [
        m for m in result["ours"] if m != "trainer" and not m.startswith("trainer.contract")
    ] == []
    # sysconfig's data module is part of the standard library under a platform-specific name.
    names = sys.stdlib_module_names
    stdlib = {m for m in result["top"] if m in names or m.startswith("_sysconfig")}
    third_party = set(result["top"]) - stdlib - {"trainer", "__main__"}
    assert third_party <= ALLOWED_THIRD_PARTY, third_party - ALLOWED_THIRD_PARTY
