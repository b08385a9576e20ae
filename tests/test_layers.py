"""The three packages keep their layers (docs/ARCHITECTURE.md): merge_core imports neither search nor evaluators nor
optuna; evaluators imports neither merge_core nor search nor optuna; no module imports itself back through others;
search/ holds no model-training code. Every import counts, also one inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("merge_core", "evaluators", "search")
FORBIDDEN = {"merge_core": {"search", "evaluators", "optuna"}, "evaluators": {"merge_core", "search", "optuna"}}


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for file in sorted((REPO / package).rglob("*.py")):
            name = ".".join(file.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            out[name] = file
    return out


def imported(name: str, file: Path) -> set[str]:
    """Every module name an import statement in `file` names (and `pkg.name` for `from pkg import name`)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".")
                keep = len(parts) - node.level + (1 if file.name == "__init__.py" else 0)
                base = ".".join(parts[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


MODULES = modules()


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_never_import_upper_ones(package):
    bad = [f"{name} imports {target}" for name, file in MODULES.items() if name.split(".")[0] == package
           for target in imported(name, file) if target.split(".")[0] in FORBIDDEN[package]]
    assert not bad, bad


def test_no_import_cycles():
    """A package's __init__ that imports its own modules (a registry, an index) does not count as a cycle."""
    packages = {name for name, file in MODULES.items() if file.name == "__init__.py"}
    graph = {name: {t for t in imported(name, file) if t in MODULES and t != name and t not in packages}
             for name, file in MODULES.items() if name not in packages}
    state: dict[str, int] = {}                 # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            assert cycle is None, " -> ".join(cycle)


def test_search_holds_no_model_training():
    training = (".backward(", "optim.Adam", "optimizer.step", "zero_grad(")
    bad = [str(f.relative_to(REPO)) for f in (REPO / "search").rglob("*.py")
           if any(word in f.read_text() for word in training)]
    assert not bad, bad
