"""The shape of the package: imports flow one way, and the CLI starts without the heavy libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SDK = Path(__file__).resolve().parents[1] / "sdk"
PACKAGE = SDK / "vitq_edge"


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(SDK).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `module` imports anywhere in its body (functions included):
    `from a.b import c` counts a.b.c where that is a module, else a.b."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {name for name in found if name in modules and name != module}


def import_cycles() -> list[list[str]]:
    """Every cycle of the import graph, as its strongly connected components (Tarjan)."""
    modules = _module_names()
    graph = {m: _imported(m, p, modules) for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycle_in_the_package():
    assert import_cycles() == []


# Imports flow one way: CLI -> commands -> lowering / devices -> quantization, models, data -> primitives.
COMMANDS = ("vitq_edge.build", "vitq_edge.build_options", "vitq_edge.compare", "vitq_edge.evaluate",
            "vitq_edge.bench", "vitq_edge.profile", "vitq_edge.report")
FORBIDDEN = {
    "vitq_edge.quant": ("vitq_edge.lower", "vitq_edge.device", "vitq_edge.cli", *COMMANDS),
    "vitq_edge.models": ("vitq_edge.lower", "vitq_edge.device", "vitq_edge.cli", *COMMANDS),
    "vitq_edge.data": ("vitq_edge.quant", "vitq_edge.lower", "vitq_edge.device", "vitq_edge.cli", *COMMANDS),
    "vitq_edge.lower": ("vitq_edge.device", "vitq_edge.cli", *COMMANDS),
    "vitq_edge.device": ("vitq_edge.lower", "vitq_edge.quant", "vitq_edge.cli", *COMMANDS),
    **{command: ("vitq_edge.cli",) for command in COMMANDS},
}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_imports_flow_one_way():
    modules = _module_names()
    upward = []
    for module, path in modules.items():
        for layer, above in FORBIDDEN.items():
            if _within(module, layer):
                upward += [f"{module} -> {name}" for name in sorted(_imported(module, path, modules))
                           if any(_within(name, a) for a in above)]
    assert upward == []


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    # The check above must be able to fail: two modules that import each other.
    package = tmp_path / "vitq_edge"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from vitq_edge import b\n")
    (package / "b.py").write_text("from vitq_edge.a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "SDK", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    assert import_cycles() == [["vitq_edge.a", "vitq_edge.b"]]


@pytest.mark.parametrize("module", ["vitq_edge", "vitq_edge.cli", "vitq_edge.recipes", "vitq_edge.build_options"])
def test_light_modules_import_no_heavy_library(module):
    # --help, `targets` and usage errors answer before torch, ExecuTorch or torchao load (seconds each).
    code = (f"import sys, {module}\n"
            "print(sorted(m for m in ('torch', 'executorch', 'torchao', 'timm') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
