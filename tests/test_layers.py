"""The house's layers: imports only point down, no file or package imports in a cycle, and `harness analyze`
runs without torch (the STYLE's "analysis that needs no torch": a login node with the light dependencies).

Every import counts, the ones inside functions too: a lazy import is still a dependency, only a later one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import ROOT, harness_env

PACKAGES = ("harness", "models", "data_pipelines", "launch")
# Lowest first. A module may import its own package and the packages of lower layers, nothing else.
# models and data_pipelines are one layer: neither imports the other.
LAYERS = [
    ("harness.core",),
    ("harness.recipe",),
    ("models", "data_pipelines"),
    ("harness.train",),
    ("harness.sweep", "harness.analysis"),  # analysis never imports sweep or train (no torch), sweep not analysis
    ("harness.probe",),
    ("harness",),  # the top: harness/cli.py, harness/demo.py, harness/__main__.py
    ("launch",),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def resolve(name: str, known: dict) -> str | None:
    """The longest prefix of a dotted name that is one of our modules (None: a library)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in known:
            return ".".join(parts[:i])
    return None


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}: relative import (use absolute imports)"
                targets = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                r = resolve(t, known)
                if r is not None and r != name:
                    graph[name].add(r)
    return graph


def package_of(module: str) -> str:
    """The layer unit a module belongs to: harness.<sub> for harness's subpackages, else its top package."""
    parts = module.split(".")
    if parts[0] == "harness" and len(parts) > 1 and parts[1] in ("core", "recipe", "train", "sweep", "analysis", "probe"):
        return ".".join(parts[:2])
    return parts[0]


def layer_of(package: str) -> int:
    return next(i for i, units in enumerate(LAYERS) if package in units)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_imports_point_down_only():
    wrong = []
    for module, targets in import_graph().items():
        here = package_of(module)
        for t in sorted(targets):
            there = package_of(t)
            if there != here and layer_of(there) >= layer_of(here):
                wrong.append(f"{module} imports {t} ({there} is not below {here})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_files_or_packages():
    graph = import_graph()
    assert not cycles(graph), "\n".join(" -> ".join(c) for c in cycles(graph))
    packages: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        packages[package_of(module)] |= {package_of(t) for t in targets} - {package_of(module)}
    assert not cycles(packages), cycles(packages)


def test_the_layer_check_sees_a_violation(tmp_path):
    """The checks above must be able to fail: an upward edge and a cycle are reported."""
    graph = {"harness.core.x": {"harness.train.y"}, "harness.train.y": {"harness.core.x"}}
    assert cycles(graph)
    assert layer_of(package_of("harness.train.y")) > layer_of(package_of("harness.core.x"))


NO_TORCH = """
import sys

class NoHeavyLibraries:
    # What a login node without the training stack has: no torch (and so no torchvision, deepspeed).
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "deepspeed"):
            raise ImportError(f"{name} is not installed here (test_layers blocks it)")
        return None

sys.meta_path.insert(0, NoHeavyLibraries())
from harness.cli import main
main(sys.argv[1:])
"""


@pytest.fixture
def finished_sweep(tmp_path):
    from tests.test_analysis import cell

    root = tmp_path / "sweep"
    for b, best in ((64, 0.5), (128, 1.0)):
        for lr in (0.25, 0.5, 1.0, 2.0):
            cell(root, "momentum", b, lr, [90.0 - 10 * abs(lr - best) + s for s in (0.0, 0.3, 0.6)])
    return root


def test_harness_analyze_runs_with_torch_unimportable(finished_sweep):
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, "analyze", str(finished_sweep), "--k", "2", "--n", "3"],
                          capture_output=True, text=True, env=harness_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| momentum | 64 |" in proc.stdout and "batch_size.png" in proc.stdout
    assert (finished_sweep / "analysis" / "table.csv").is_file()
    # The blocker works: a command that needs torch fails under it.
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, "plan", str(ROOT / "yaml" / "digits_mlp.yaml")],
                          capture_output=True, text=True, env=harness_env(), cwd=ROOT, timeout=300)
    assert proc.returncode != 0 and "test_layers blocks it" in proc.stderr
