"""The api's modules import each other without a cycle, and only at the top of a module: an
import inside a function is how a cycle hides (docs/architecture.md, "The boxes"). The graph is
read from the source with `ast`, so a cycle fails here even where Python's import order would
happen to tolerate it."""

from __future__ import annotations

import ast
from pathlib import Path

import api

ROOT = Path(api.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}
# Where an import inside a function has a reason other than a cycle (the cycle check below
# counts these imports all the same, so none can hide one).
LATE_ALLOWED = {
    # The Cloud Run dispatcher pulls in the Google client libraries; a local set-up never needs
    # them, so `make_dispatcher` imports the one it picks, and the OIDC check of a callback
    # imports it only when a Cloud Run execution's token is to be confirmed.
    "api.dispatch",
    "api.auth.oidc",
    # Command modules: each action imports what it uses, so `--help` and the thin HTTP
    # clients that CI runs start without fastapi and SQLAlchemy (api/cli/__init__.py).
    "api.cli",
}


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The api modules `node` imports (a package's submodule when it names one)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    if node.level or not node.module or node.module not in MODULES:
        return []
    subs = [f"{node.module}.{a.name}" for a in node.names]
    return [s for s in subs if s in MODULES] or [node.module]


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """Edges module -> modules it imports; and every import of an api module made inside a
    function (or method) where LATE_ALLOWED gives no reason for it."""
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    late: list[str] = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        skipped = {id(n) for top in tree.body if _type_checking(top) for n in ast.walk(top)}
        in_functions = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
            for n in ast.walk(f)
        }
        allowed = name in LATE_ALLOWED or name.rsplit(".", 1)[0] in LATE_ALLOWED
        for node in ast.walk(tree):
            if id(node) in skipped or not isinstance(node, ast.Import | ast.ImportFrom):
                continue  # an import under TYPE_CHECKING never runs: no edge
            if found := _imported(node):
                edges[name].update(found)
                if id(node) in in_functions and not allowed:
                    late.append(f"{name}:{node.lineno} imports {', '.join(found)}")
    return edges, late


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_reader_sees_every_module_and_import() -> None:
    edges, _ = _graph()
    assert len(edges) > 40
    assert "api.runs.models" in edges["api.runs.service"]
    assert "api.runs.service" in edges["api.runs.routes"]
    assert "api.dispatch.cloudrun" in edges["api.dispatch"]  # imported inside a function


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_api() -> None:
    edges, _ = _graph()
    assert _cycle(edges) is None


def test_no_api_import_inside_a_function() -> None:
    _, late = _graph()
    assert late == []
