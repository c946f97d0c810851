"""The import structure: no cycles between files or packages, and worker processes import
nothing of the driver stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dist_runtime", "workers", "kernels")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module a file imports (at top level or inside functions; not under
    TYPE_CHECKING), resolved to the project's own modules."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for stmt in node.orelse:
                visit(stmt)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports, with the implicit import of each parent package
    (importing a.b.c runs a/__init__ and a/b/__init__)."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (REPO_ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        raw = _imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
        deps: set[str] = set()
        for target in raw:
            while target and target not in files:  # `from pkg import name`: name is no module
                target = target.rpartition(".")[0]
            parts = target.split(".")
            deps.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def package_of(module: str) -> str:
    """A module's package node: a subpackage with everything below it (e.g.
    `dist_runtime.engine` with its executors, `workers.layers`) is one node; each file at the
    top of a package (e.g. `dist_runtime.config`, shared by driver and workers, or
    `workers.distributed`) is a node of its own."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_files() -> None:
    graph = import_graph()
    assert "dist_runtime.engine.engine" in graph["dist_runtime.runtime"]
    assert cycles(graph) == []


def test_no_import_cycle_between_packages() -> None:
    graph: dict[str, set[str]] = {}
    for module, deps in import_graph().items():
        node = package_of(module)
        graph.setdefault(node, set()).update(package_of(d) for d in deps if package_of(d) != node)
    assert "dist_runtime.engine" in graph["dist_runtime.jobs"]
    assert cycles(graph) == []


def _fresh(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("module", ["workers.models.layouts", "workers.worker", "dist_runtime"])
def test_imports_in_a_fresh_interpreter(module: str) -> None:
    assert _fresh(f"import {module}; print('ok')") == "ok"


def test_worker_process_imports_no_driver_stack() -> None:
    """Beyond what torch itself loads (torch.hub imports tqdm), a worker loads no SQLite,
    Jinja or tqdm, and of the driver package only what both sides share (the config, the
    step protocol, the 4-bit weight format, LoRA adapter folders, the heap freeze and the
    memory planner's CPU KV policy)."""
    code = (
        "import sys; import torch; before = set(sys.modules); import workers.worker; "
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in "
        "('sqlite3', '_sqlite3', 'jinja2', 'tqdm', 'dist_runtime')))"
    )
    modules = ast.literal_eval(_fresh(code))
    assert not [m for m in modules if not m.startswith("dist_runtime")], modules
    shared = {
        "dist_runtime.config",
        "dist_runtime.protocol",
        "dist_runtime.formats.int4",
        "dist_runtime.lora",
        "dist_runtime.formats.lora_adapter",
        "dist_runtime.heap",
        "dist_runtime.memory_planner",
    }
    assert set(modules) <= {"dist_runtime", "dist_runtime.formats", *shared}
