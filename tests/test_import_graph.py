"""The product's imports go one way: no module imports, directly or through others, a module that
imports it back, counting imports inside functions too (they are arrows all the same, only later).

The graph is read from the sources with the installed package's layout: ``patterns/`` and
``triton_kernels/`` are ``inductor_fusion.patterns`` and ``inductor_fusion.triton_kernels``.
The intended direction: config -> registry -> pass -> patterns -> kernels, with leaves
(``catalogue``, ``graph_paths``, ``pass_state``, ``report``) that everyone may import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "inductor_fusion": ROOT / "inductor_fusion",
    "inductor_fusion.patterns": ROOT / "patterns",
    "inductor_fusion.triton_kernels": ROOT / "triton_kernels",
}
# Modules that must import nothing of ours at all (module level or inside functions).
LEAVES = ("inductor_fusion.catalogue", "inductor_fusion.graph_paths", "inductor_fusion.report")


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.glob("*.py"):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """Our modules that ``name`` imports anywhere in its source (not under TYPE_CHECKING)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST) -> Iterator[str]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                # `from pkg import name`: the submodule if it is one, else the package itself.
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in child.names
                ]
            else:
                yield from visit(child)
                continue
            for target in targets:
                module = resolve(target)
                if module is not None and module != name:
                    yield module

    yield from visit(ast.parse(path.read_text()))


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: set(imported(name, path, known)) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def test_the_graph_is_read() -> None:
    edges = graph()
    # A few arrows that exist, so that a broken reader cannot pass by finding none.
    assert "inductor_fusion.pass_state" in edges["inductor_fusion.patterns.norm_mlp"]
    assert "inductor_fusion.registry" in edges["inductor_fusion.config"]
    assert "inductor_fusion.triton_kernels.rmsnorm_mlp" in edges["inductor_fusion.layers"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_patterns_and_kernels_never_import_the_pass_or_the_front() -> None:
    front = {
        f"inductor_fusion.{name}"
        for name in (
            "backend",
            "config",
            "eager_swap",
            "fusion_entries",
            "fusion_pass",
            "global_pass",
            "hf_hooks",
            "kernel_config",
            "model_plans",
            "registry",
        )
    }
    for name, targets in graph().items():
        if name.startswith(("inductor_fusion.patterns", "inductor_fusion.triton_kernels")):
            assert not targets & front, f"{name} imports {sorted(targets & front)}"


def test_leaves_import_nothing_of_ours() -> None:
    edges = graph()
    for leaf in LEAVES:
        assert not edges[leaf], (leaf, sorted(edges[leaf]))


def test_transformers_is_patched_from_one_module_installed_by_the_front() -> None:
    # hf_hooks holds every patch of transformers' classes; only the KernelConfig and install()
    # put them in place.
    importers = {name for name, targets in graph().items() if "inductor_fusion.hf_hooks" in targets}
    assert importers <= {"inductor_fusion.kernel_config", "inductor_fusion.global_pass"}, importers
