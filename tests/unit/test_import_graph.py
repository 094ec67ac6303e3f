"""The package's import graph: no module of ``spmd_diff`` imports itself back through others, counting imports at
the top of a module and inside functions alike (a function-level import only hides a cycle, it does not break
it), and the data plane's parts import in one direction."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import spmd_diff

ROOT = Path(spmd_diff.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@functools.lru_cache(maxsize=1)
def import_graph() -> dict[str, frozenset[str]]:
    """``{module: spmd_diff modules it imports}``, every ``import`` statement anywhere in the file (type-checking
    blocks included), ``from X import name`` counted as an import of ``X.name`` where that is a module."""
    files = {_module_name(path): path for path in ROOT.rglob("*.py")}
    graph: dict[str, frozenset[str]] = {}
    for name, path in files.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = _resolve(name, path.name == "__init__.py", node)
                targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in files else module
                           for alias in node.names]
            for target in targets:
                while target and target not in files:  # a name inside a module: the module
                    target = target.rpartition(".")[0]
                if target.startswith("spmd_diff") and target != name:
                    edges.add(target)
        graph[name] = frozenset(edges)
    return graph


def find_cycle(graph: dict) -> list[str]:
    """One import cycle as a list of modules (first == last), or [] if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return []


def test_the_walker_finds_a_cycle_hidden_in_a_function():
    tree = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(tree) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    assert "spmd_diff.comm.host_exchange" in graph["spmd_diff.comm.collectives"]  # from-imports resolve
    assert "spmd_diff.comm.kernel_loader" in graph["spmd_diff.comm.nvshmem"]  # a function-level import counts


def test_no_import_cycles_in_spmd_diff():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_data_plane_imports_in_one_direction():
    """Pure layouts and wire formats import no endpoint or group code; the two exchange implementations do not
    import the Group API they serve."""
    graph = import_graph()
    comm = {name.rpartition(".")[2]: {t.rpartition(".")[2] for t in edges if t.startswith("spmd_diff.comm.")}
            for name, edges in graph.items() if name.startswith("spmd_diff.comm.")}
    assert comm["heap_layout"] <= {"transport"}
    assert comm["wire"] <= {"transport", "heap_layout"}
    assert comm["collective_layout"] <= {"transport"}
    assert comm["exchange"] <= {"collective_layout", "transport"}
    for implementation in ("host_exchange", "fused_exchange"):
        assert "collectives" not in comm[implementation], implementation
    assert comm["kernel_loader"] == set()
