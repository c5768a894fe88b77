"""Rules of the api's layout that a reviewer would otherwise have to remember
(docs/architecture.md, "Where a change goes"): route modules stay thin, so every query lives in
a domain's service or query module where the REST api and the dashboard share it."""

from __future__ import annotations

import ast
from pathlib import Path

import api

ROOT = Path(api.__file__).parent
DB_CALLS = {"get", "exec", "execute", "scalars", "scalar", "add", "commit", "flush"}


def _route_modules() -> list[Path]:
    """Modules that define a FastAPI router."""
    return [p for p in sorted(ROOT.rglob("*.py")) if "APIRouter(" in p.read_text()]


def _db_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        call = node.func if isinstance(node, ast.Call) else None
        if (
            isinstance(call, ast.Attribute)
            and call.attr in DB_CALLS
            and isinstance(call.value, ast.Name)
            and call.value.id == "session"
        ):
            found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} session.{call.attr}")
        if isinstance(call, ast.Name) and call.id == "select":
            found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} select(...)")
    return found


def test_the_checker_sees_route_modules_and_queries() -> None:
    modules = {p.relative_to(ROOT).as_posix() for p in _route_modules()}
    assert {"runs/routes.py", "web/runs_list.py", "events/routes.py"} <= modules
    assert _db_calls(ROOT / "runs" / "query.py")  # a query module does query


def test_no_route_module_queries_the_database() -> None:
    assert [c for p in _route_modules() for c in _db_calls(p)] == []


def test_the_dashboard_calls_no_rest_handler() -> None:
    # The dashboard and the REST routes both call the domains' services; neither calls the other.
    imports = []
    for path in sorted((ROOT / "web").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                imports += [f"{path.name}: {n}" for n in names if n.endswith("routes")]
    assert imports == []
