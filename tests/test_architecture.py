"""Imports point down (docs/ARCHITECTURE.md): every `mmmamba` import, module-level or inside a function, goes from a
floor to a lower one or stays inside its own subpackage, and no modules import each other in a loop."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mmmamba"

# The floors, lowest first. A subpackage (or top-level module) may import its own modules and those of lower floors.
FLOORS = [
    {"ops"},                              # kernels and their torch references
    {"layers"},                           # attention, the Mamba-2 mixer, MLP, norms, RoPE
    {"models"},                           # config, decoder, cache, placement specs, reference generation
    {"io", "__init__"},                   # checked save / load; the package's face
    {"data", "teachers", "inference"},    # corpora; teacher adapters; the serving engine
    {"distill", "bench", "eval", "serve"},  # training, benchmarks, metrics, the web demo
    {"demo"},                             # the offline demo run
    {"cli"},                              # `mmmamba ...`
]
FLOOR = {name: i for i, names in enumerate(FLOORS) for name in names}

# (importer, imported) pairs allowed to climb or to cross on one floor: none today.
EXCEPTIONS: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = ("mmmamba",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The mmmamba modules an import statement names (`from .x import y` may name module x.y)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "mmmamba"]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "mmmamba":
        return []
    return [target] + [f"{target}.{a.name}" for a in node.names]


def _imports() -> dict[str, set[str]]:
    """module -> the mmmamba modules it imports (anywhere in the file)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        named = set()
        for node in ast.walk(tree):
            named.update(_targets(node, module, path.name == "__init__.py"))
        # a module's own packages are initialised before it: importing from them is no edge of the graph
        ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        graph[module] = {t for t in named if t in files and t != module and t not in ancestors}
    return graph


def _unit(module: str) -> str:
    """The floor unit of a module: its subpackage, or the top-level module's own name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_subpackage_has_a_floor():
    units = {_unit(m) for m in _imports()}
    unknown = sorted(units - FLOOR.keys())
    assert not unknown, (
        f"{unknown} have no floor: add each to FLOORS in tests/test_architecture.py (and to docs/ARCHITECTURE.md) "
        "above everything it imports and below everything that imports it"
    )


def test_imports_point_down():
    climbing = []
    for module, targets in _imports().items():
        src = _unit(module)
        for target in sorted(targets):
            dst = _unit(target)
            if src == dst or src not in FLOOR or dst not in FLOOR or (src, dst) in EXCEPTIONS:
                continue
            if FLOOR[dst] >= FLOOR[src]:
                climbing.append(f"{module} (floor {FLOOR[src]}) imports {target} (floor {FLOOR[dst]})")
    assert not climbing, (
        "imports that climb or cross a floor; move the imported name down to the floor that needs it:\n  "
        + "\n  ".join(climbing)
    )


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "modules that import each other (a function-local import counts too):\n  " + "\n  ".join(cycles)


@pytest.mark.parametrize("source, expected", [
    ("from ..ops import ssd", {"mmmamba.ops", "mmmamba.ops.ssd"}),
    ("from . import engine", {"mmmamba.inference", "mmmamba.inference.engine"}),
    ("import mmmamba.models.config", {"mmmamba.models.config"}),
    ("import torch", set()),
])
def test_targets_resolve_relative_imports(source, expected):
    """The parser the checks rely on: relative imports resolve from the importing module's package."""
    node = ast.parse(source).body[0]
    assert set(_targets(node, "mmmamba.inference.engine", is_package=False)) == expected
