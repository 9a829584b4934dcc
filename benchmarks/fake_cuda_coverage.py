"""How much of the GPU-only code the fake-CUDA tier executes: `make fake-cuda-coverage` (docs/fake_cuda.md).

    python benchmarks/fake_cuda_coverage.py [--list] [--skip-run]

1. Runs the tier (pytest -m fake_cuda) under coverage.py, over the project's packages.
2. Finds the GPU-only lines by reading the source (ast), in harness/, models/, data_pipelines/, launch/ and
   benchmarks/ (less gpu.py and gpu_check.py, which run on a real GPU (`make gpu-check`), and this script):
     - the CUDA side of every `if` whose condition names CUDA (`device.type == "cuda"`, `torch.cuda.is_available()`,
       `use_cuda`, ...) or GPU decoding (`gpu_decode`): the body, or the `else` of a negated test (`!= "cuda"`);
     - every line that calls `torch.cuda.*` or picks a value with `... if <CUDA test> else ...`;
     - the body of every function whose name says so (`_gpu_decode`).
   A CPU run takes none of these bodies, so "executed by the tier" is "executed only because the device was cuda"
   (the one-line `x if cuda else y` lines are executed on either device; they are counted where the tier runs them).
3. Prints the fraction of those lines the tier executed, and with --list every line it did not, with its source.
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


def negated(test: ast.AST) -> bool:
    """`not ...cuda...` or `... != "cuda"`: the CUDA side is the else branch."""
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return True
    return isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.NotEq)


def span(stmts: list[ast.stmt]) -> set[int]:
    return set(range(stmts[0].lineno, stmts[-1].end_lineno + 1)) if stmts else set()


def gpu_lines(source: str) -> set[int]:
    """The lines of `source` that run only on the GPU path (see the module docstring)."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.If) and names_cuda(node.test):
            lines |= span(node.orelse if negated(node.test) else node.body)
        elif isinstance(node, ast.IfExp) and names_cuda(node.test):
            lines.add(node.lineno)
        elif isinstance(node, ast.Attribute) and ast.unparse(node).startswith("torch.cuda."):
            lines.add(node.lineno)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(w in node.name for w in WORDS):
            lines |= span(node.body)
    return lines


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
    total, missed = 0, []
    for path in sources():
        text = path.read_text()
        want = gpu_lines(text)
        if not want:
            continue
        _, statements, _, missing, _ = cov.analysis2(str(path))
        lines = text.splitlines()
        for n in sorted(want & set(statements)):
            total += 1
            if n in missing:
                missed.append(f"{path.relative_to(ROOT)}:{n}: {lines[n - 1].strip()}")
    reached = total - len(missed)
    fraction = reached / total if total else 1.0
    print(f"fake-CUDA tier: {reached} of {total} GPU-only lines executed ({100 * fraction:.1f}%)")
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
