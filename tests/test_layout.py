"""The code's shape, checked: no import circles, and each process imports only its side.

Module-level imports only (``if TYPE_CHECKING:`` blocks aside): an import inside a function
runs late and is allowed to break a circle, as Python allows it.
"""

from __future__ import annotations

import ast
from pathlib import Path

from processes import REPO_ROOT

PACKAGES = ("gateway", "worker", "protocol")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def top_level_imports(path: Path) -> set[str]:
    """Modules imported at module level, ``from X import name`` counted as X.name when that is a module."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for inner in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else ():
            if isinstance(inner, ast.Import):
                found.update(alias.name for alias in inner.names)
            elif isinstance(inner, ast.ImportFrom) and inner.module and inner.level == 0:
                found.add(inner.module)
                found.update(f"{inner.module}.{alias.name}" for alias in inner.names)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for package in PACKAGES for p in (REPO_ROOT / package).rglob("*.py")}
    return {name: {m for m in top_level_imports(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circles() -> None:
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_each_process_imports_only_its_side() -> None:
    for package, forbidden in (("gateway", ("mlx", "mlx_lm", "worker")), ("worker", ("fastapi", "starlette", "gateway")),
                               ("protocol", ("gateway", "worker", "mlx", "fastapi"))):
        for path in (REPO_ROOT / package).rglob("*.py"):
            imported = {name.split(".")[0] for name in top_level_imports(path)}
            assert not imported & set(forbidden), f"{path.relative_to(REPO_ROOT)} imports {imported & set(forbidden)}"


def test_every_package_is_in_the_distribution():
    """pyproject.toml lists packages by hand: a new one left out works in a checkout (an editable
    install) and is missing from a built wheel."""
    from gateway.models.catalog import tomllib  # tomli on Python 3.10

    listed = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    present = {module_name(init) for top in PACKAGES for init in (REPO_ROOT / top).rglob("__init__.py")}
    assert present <= listed, sorted(present - listed)
