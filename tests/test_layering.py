"""The package's layering, read from the source with `ast` (function-level imports included, since a lazy import
is still a dependency): no import cycles, every import points down the layers (LAYERS below), the trainer never
names a method, Hydra only at the edge, the run directory's contract (rundir.py) needs only the standard library
and lorabench's errors / distributed, and no function is over 80 lines."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "lorabench"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Every module `name` imports (top-level names, lorabench modules resolved to the module or package)."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return found


def _graph() -> dict[str, set[str]]:
    """lorabench module → the lorabench modules it needs loaded: its imports, and the parent package of each
    (importing lorabench.methods.base runs lorabench/methods/__init__.py first)."""
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        deps = {d for d in _imports(name) if d in MODULES}
        for d in list(deps):
            parts = d.split(".")
            deps.update(".".join(parts[:k]) for k in range(2, len(parts)))
        deps.discard(name)
        deps.discard("lorabench")
        if name.count(".") > 1:  # a submodule needs its package (but not the package its own submodules)
            deps.add(name.rsplit(".", 1)[0])
        graph[name] = {d for d in deps if not d.startswith(name + ".")} - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, "\n".join(f"{c}: " + "; ".join(f"{m} → {sorted(graph[m] & set(c))}" for m in c)
                                 for c in cycles)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_trainer_names_no_method():
    for name in MODULES:
        if name.startswith("lorabench.training"):
            bad = {d for d in _imports(name) if d.startswith("lorabench.methods")}
            assert not bad, f"{name} imports {bad}: schedules reach the trainer as hooks"


def test_hydra_only_at_the_edge():
    edge = {"lorabench.cli", "lorabench.hydra_callback", "lorabench.export"}
    for name in MODULES:
        heavy = {d for d in _imports(name) if d.split(".")[0] in ("hydra", "omegaconf")}
        assert not heavy or name in edge, f"{name} imports {heavy}; configs reach the core as plain dicts"


def test_the_run_directory_contract_is_light():
    allowed = set(sys.stdlib_module_names) | {"lorabench.errors", "lorabench.distributed", "__future__"}
    deps = {d for d in _imports("lorabench.rundir") if d.split(".")[0] != "lorabench" or d.startswith("lorabench.")}
    heavy = {d for d in deps if d.split(".")[0] not in allowed and d not in allowed}
    assert not heavy, f"rundir imports {heavy}"


# The layers, bottom up (issue 17's dependency direction). A module may import its own layer or lower ones; a new
# module must be placed here. training.hooks sits low: it is the interface the methods implement, not the loop.
LAYERS = [
    {"errors", "validate", "metrics", "paired", "tuning", "distributed", "interrupt"},
    {"budget", "rundir", "training", "training.hooks"},
    {"data", "methods", "methods.*"},
    {"backbone", "training.trainer", "training.checkpoint"},
    {"assemble", "tracking"},
    {"plan", "export"},
    {"run"},
    {"cli", "report", "hydra_callback"},
]


def _layer(module: str) -> int:
    short = module[len("lorabench."):]
    for i, layer in enumerate(LAYERS):
        if short in layer or any(p.endswith(".*") and short.startswith(p[:-1]) for p in layer):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_layering.py: place it there")


def test_every_import_points_down_the_layers():
    upward = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
              for m, deps in _graph().items() if m != "lorabench" for d in deps if _layer(d) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_function_over_80_lines():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, "\n".join(long)
