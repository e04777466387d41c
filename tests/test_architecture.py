"""The import contract: layers that point one way, and no cycles.

    core  <-  data  <-  models  <-  engine  <-  report  <-  apps  <-  cli, cnnlab (the API)

A module may import its own layer and the layers to its left, never one to its right. Every
import counts, inside functions too: a lazy import still makes the lower layer depend on the
upper one. The README's "Layout" section draws the same picture.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cnnlab"
LAYERS = ("core", "data", "models", "engine", "report", "apps", "top")
LAYER_OF_PACKAGE = {"cnnlab.core": "core", "cnnlab.recipes": "core", "cnnlab.data": "data",
                    "cnnlab.models": "models", "cnnlab.engine": "engine", "cnnlab.report": "report",
                    "cnnlab.apps": "apps", "cnnlab.cli": "top", "cnnlab.__main__": "top", "cnnlab.api": "top",
                    "cnnlab": "top"}


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    names = {}
    for path in root.rglob("*.py"):
        parts = ("cnnlab", *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def layer(module: str) -> str:
    best = max((p for p in LAYER_OF_PACKAGE if module == p or module.startswith(p + ".")), key=len)
    return LAYER_OF_PACKAGE[best]


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The cnnlab modules ``path`` imports: ``from a.b import c`` is ``a.b.c`` when that is a
    module, else ``a.b``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "cnnlab"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "cnnlab":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    names = module_names(root)
    return {m: imports_of(p, set(names)) - {m} for m, p in names.items()}


def back_pointing(deps: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({layer(m)}) imports {d} ({layer(d)})" for m, ds in deps.items() for d in ds
                  if LAYERS.index(layer(d)) > LAYERS.index(layer(m)))


def cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        for d in deps.get(m, ()):
            if d not in index:
                visit(d)
                low[m] = min(low[m], low[d])
            elif d in stack:
                low[m] = min(low[m], index[d])
        if low[m] == index[m]:
            group = []
            while True:
                top = stack.pop()
                group.append(top)
                if top == m:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for m in sorted(deps):
        if m not in index:
            visit(m)
    return found


def test_every_module_has_a_layer():
    assert {layer(m) for m in module_names()} <= set(LAYERS)


def test_imports_point_down_the_layers():
    assert back_pointing(graph()) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_contract_catches_a_back_pointing_import_and_a_cycle(tmp_path):
    """The checks above can fail: a copy of the package with one import added is refused."""
    import shutil
    copy = tmp_path / "cnnlab"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "static", "*.yaml"))
    errors = copy / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom cnnlab.engine.loop import fit  # noqa\n")
    deps = graph(copy)
    assert "cnnlab.core.errors (core) imports cnnlab.engine.loop (engine)" in back_pointing(deps)
    assert any("cnnlab.core.errors" in group for group in cycles(deps))


@pytest.mark.parametrize("module", ["cnnlab.core.config", "cnnlab.core.errors", "cnnlab.core.files"])
def test_core_imports_no_torch(module):
    # The command line parses and reports bad input before torch's 1-2 s import.
    tree = ast.parse(module_names()[module].read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in imported
