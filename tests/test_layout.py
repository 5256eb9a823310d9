"""The package's layout rules (issue 15): no import circle inside peftplan, no module over ~500 lines, and
each module opens with a docstring saying its job.

The import graph is read with `ast` from the source, top-level and function-level imports alike (a lazy
import inside a function still ties the two modules together), so a circle fails here before it fails
at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "peftplan"
MAX_LINES = 520  # "no module over ~500 lines"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(tree: ast.AST, top_level_only: bool) -> list[ast.AST]:
    """The import statements of a module that can run: all of them, or those that run when it is imported
    (not inside a function). Imports under `if TYPE_CHECKING:` never run and are left out of both."""
    out: list[ast.AST] = []
    todo = list(ast.iter_child_nodes(tree))
    while todo:
        node = todo.pop()
        if top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def import_graph(modules: dict[str, Path] | None = None, top_level_only: bool = False) -> dict[str, set[str]]:
    """module -> the peftplan modules it imports (anywhere in its body, or only at import time).
    `from pkg import name` counts as importing pkg.name when that is a module, else pkg."""
    modules = modules if modules is not None else _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path)), top_level_only):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # peftplan.engine.ops.x -> peftplan.engine.ops
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("peftplan"):
                    deps.add(target)
        # a package's __init__ importing its own submodules is not a circle with them; a submodule
        # importing its package is (the package runs first), so only that direction is kept
        graph[name] = {d for d in deps if not (is_package and d.startswith(name + "."))}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# Circles closed only by imports inside functions (they cannot fail at import time, but tie the modules
# together). These were there when the check was written; the list may only shrink.
KNOWN_LAZY_CIRCLES: list[set[str]] = []  # none left (2026-12-02); a new one fails the test below


def test_no_import_circle_at_import_time() -> None:
    cycles = find_cycles(import_graph(top_level_only=True))
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_new_import_circle_through_function_level_imports() -> None:
    cycles = find_cycles(import_graph())
    new = [c for c in cycles if not any(set(c) <= known for known in KNOWN_LAZY_CIRCLES)]
    assert not new, "new import circles: " + "; ".join(" <-> ".join(c) for c in new)


def test_the_circle_finder_finds_circles(tmp_path: Path) -> None:
    """The check can fail: a two-module circle through a function-level import is found."""
    pkg = tmp_path / "peftplan"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")
    (pkg / "c.py").write_text("from .a import b\n")
    mods = {"peftplan": pkg / "__init__.py", "peftplan.a": pkg / "a.py", "peftplan.b": pkg / "b.py",
            "peftplan.c": pkg / "c.py"}
    graph = import_graph(mods)
    assert graph["peftplan.c"] == {"peftplan.a"}
    assert find_cycles(graph) == [["peftplan.a", "peftplan.b"]]
    assert find_cycles(import_graph(mods, top_level_only=True)) == []  # b imports a inside a function only
    (pkg / "b.py").write_text("from .a import g\n")
    assert find_cycles(import_graph(mods, top_level_only=True)) == [["peftplan.a", "peftplan.b"]]


# Over the limit and not split yet (issue 15): strict xfail, so splitting one makes its case pass loudly and
# it must then leave this set.
NOT_YET_SPLIT: set[str] = set()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason="over 520 lines, "
                                                                          "not split yet"))
                                  if n in NOT_YET_SPLIT else n for n in sorted(_modules())])
def test_module_size_and_docstring(name: str) -> None:
    path = _modules()[name]
    text = path.read_text(encoding="utf-8")
    n = text.count("\n")
    assert n <= MAX_LINES, f"{path.relative_to(ROOT.parent)}: {n} lines (more than {MAX_LINES}): split it by concern"
    if text.strip():
        assert ast.get_docstring(ast.parse(text)), f"{path.relative_to(ROOT.parent)}: no module docstring saying its job"
