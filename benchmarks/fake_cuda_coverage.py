"""How much of the GPU-only code the fake-CUDA tier executes: `make fake-cuda-coverage` (docs/fake_cuda.md).

    python benchmarks/fake_cuda_coverage.py [--list] [--skip-run]

1. Runs the tier (pytest -m fake_cuda) under coverage.py, over the project's packages.
2. Finds the GPU-path statements by reading the source (ast), in harness/, models/, data_pipelines/, launch/ and
   benchmarks/ (less gpu.py and gpu_check.py, which run on a real GPU (`make gpu-check`), and this script):
     - CUDA-only: the CUDA side of every `if` whose condition names CUDA (`device.type == "cuda"`,
       `torch.cuda.is_available()`, `use_cuda`, ...) or GPU decoding (`gpu_decode`): its body, or the `else` of a
       negated test (`!= "cuda"`); and the body of every function named so (`_gpu_decode`). A CPU run takes none.
     - CUDA-dependent: every other simple statement that uses torch.cuda / torch.backends.cuda(nn), compares
       with "cuda" (`x if device.type == "cuda" else y`, `backend="nccl" if ...`) or reads a `cuda`/`use_cuda`
       flag (`pin_memory=cuda`), and those `if` lines themselves. A CPU run executes them too,
       with the other value; the tier executes them with the CUDA one.
3. Prints the share of those statements the tier executed, and with --list every one it did not, with its source.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "models", "data_pipelines", "launch", "benchmarks")
REAL_GPU_ONLY = {"benchmarks/gpu.py", "benchmarks/gpu_check.py", "benchmarks/fake_cuda_coverage.py"}
WORDS = ("cuda", "gpu_decode")


def names_cuda(node: ast.AST) -> bool:
    return any(word in ast.unparse(node) for word in WORDS)


def depends_on_cuda(stmt: ast.stmt) -> bool:
    """A torch.cuda / torch.backends.cuda(nn) attribute, a comparison with "cuda", or a `cuda`/`use_cuda` flag
    (not docstrings or config-key names that merely mention it)."""
    for n in ast.walk(stmt):
        if isinstance(n, ast.Attribute) and ast.unparse(n).startswith(("torch.cuda", "torch.backends.cud")):
            return True
        if isinstance(n, ast.Compare) and any(isinstance(c, ast.Constant) and c.value == "cuda"
                                              for c in [n.left, *n.comparators]):
            return True
        if isinstance(n, ast.Name) and "cuda" in n.id:
            return True
    return False


def negated(test: ast.AST) -> bool:
    """`not ...cuda...` or `... != "cuda"`: the CUDA side is the else branch."""
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return True
    return isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.NotEq)


def gpu_lines(source: str) -> tuple[set[int], set[int]]:
    """(CUDA-only, CUDA-dependent) statement lines of `source` (see the module docstring): the first line of each
    statement, as coverage.py counts them."""
    only: set[int] = set()
    dependent: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.If) and names_cuda(node.test):
            dependent.add(node.lineno)
            only |= statements(node.orelse if negated(node.test) else node.body)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(w in node.name for w in WORDS):
            only |= statements(node.body)
        elif isinstance(node, ast.stmt) and not isinstance(node, COMPOUND) and depends_on_cuda(node):
            dependent.add(node.lineno)
    return only, dependent - only


COMPOUND = (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def statements(body: list[ast.stmt]) -> set[int]:
    return {n.lineno for stmt in body for n in ast.walk(stmt) if isinstance(n, ast.stmt)}


def sources() -> list[Path]:
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if str(path.relative_to(ROOT)) not in REAL_GPU_ONLY:
                out.append(path)
    return out


def run_tier(data_file: Path) -> None:
    cmd = [sys.executable, "-m", "coverage", "run", f"--data-file={data_file}", f"--source={','.join(PACKAGES)}",
           "-m", "pytest", "-q", "-m", "fake_cuda", "-p", "no:cacheprovider", "tests"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0:
        sys.exit(f"fake_cuda_coverage: the tier failed (exit {proc.returncode}): {' '.join(cmd)}")


def report(data_file: Path, listing: bool) -> float:
    import coverage

    cov = coverage.Coverage(data_file=str(data_file))
    cov.load()
    counts = {"CUDA-only": [0, 0], "CUDA-dependent": [0, 0]}  # [lines, executed]
    missed, all_statements, all_missing = [], 0, 0
    for path in sources():
        text = path.read_text()
        _, statements_, _, missing, _ = cov.analysis2(str(path))
        all_statements, all_missing = all_statements + len(statements_), all_missing + len(missing)
        lines = text.splitlines()
        for kind, want in zip(counts, gpu_lines(text)):
            for n in sorted(want & set(statements_)):
                counts[kind][0] += 1
                if n in missing:
                    missed.append(f"{path.relative_to(ROOT)}:{n} ({kind}): {lines[n - 1].strip()}")
                else:
                    counts[kind][1] += 1
    total = sum(c[0] for c in counts.values())
    reached = sum(c[1] for c in counts.values())
    fraction = reached / total if total else 1.0
    print(f"fake-CUDA tier: {reached} of {total} GPU-path statements executed ({100 * fraction:.1f}%): "
          + "; ".join(f"{kind} {c[1]} of {c[0]}" for kind, c in counts.items()))
    print(f"  (all {all_statements} statements of {', '.join(PACKAGES)}: "
          f"{100 * (all_statements - all_missing) / max(all_statements, 1):.1f}% executed by the tier)")
    if listing:
        for line in missed:
            print(f"  not reached: {line}")
    return fraction


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="list the GPU-only lines the tier does not execute")
    p.add_argument("--skip-run", action="store_true", help="report from the data of the last run")
    args = p.parse_args()
    data_file = Path(tempfile.gettempdir()) / "harness-fake-cuda.coverage"
    if not args.skip_run:
        data_file.unlink(missing_ok=True)
        run_tier(data_file)
    report(data_file, args.list)


if __name__ == "__main__":
    main()
