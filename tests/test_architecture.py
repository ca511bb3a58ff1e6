"""The layout's rules, checked on the code itself: no import cycles, pipeline/ never imports experiments/,
a light command-line edge, few flat modules, short files. ``make lint`` checks the layers with import-linter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "harmsweep"
MAX_FLAT_MODULES = 12
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> harmsweep modules it imports anywhere (functions and TYPE_CHECKING blocks included)."""

    def owner(name: str) -> str:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in mods else ""

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {owner(a.name) for a in node.names if a.name.startswith("harmsweep")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("harmsweep"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    found.add(owner(full) if full in mods else owner(str(node.module)))
        graph[mod] = found - {mod, "", "harmsweep"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_counting_imports_inside_functions():
    assert cycles(imports(modules())) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_pipeline_never_imports_the_experiments_built_on_it():
    graph = imports(modules())
    upward = {m: sorted(t for t in graph[m] if t.startswith("harmsweep.experiments")) for m in graph}
    assert {m: t for m, t in upward.items() if t and m.startswith("harmsweep.pipeline")} == {}


EDGE = ["harmsweep.cli", "harmsweep.config.schema", "harmsweep.config.checks", "harmsweep.config.compose",
        "harmsweep.config.identity", "harmsweep.sweep.launcher", "harmsweep.sweep.jobs", "harmsweep.sweep.storage",
        "harmsweep.sweep.plan", "harmsweep.sweep.sizing", "hydra_plugins.harmsweep_launcher.harmsweep_launcher"]  # fmt: skip


@pytest.mark.parametrize("module", EDGE)
def test_the_command_line_and_sweep_side_import_no_torch(module):
    """Hydra imports these on every start (and `harmsweep --help` composes the config): no torch, no transformers."""
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_at_most_twelve_flat_modules_and_no_long_files():
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(flat) <= MAX_FLAT_MODULES, flat
    long = {
        str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
