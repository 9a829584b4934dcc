"""`make docs-figures`: rerun every command whose output the docs quote, and rewrite those blocks in place.

A quoted block sits between two markers in README.md or docs/*.md:

    <!-- generated: NAME -->
    ... replaced by this script ...
    <!-- end generated -->

Each NAME is made by one function below from the real commands, run exactly as the docs print them (`$ harness
...`) in a fresh scratch directory that holds links to this checkout's yaml/, slurm/ and docs/: nothing finished
before is reused, so a code change shows up in the next run of this script. Figures the docs show are copied from
the same runs into docs/. tests/test_docs.py runs the quick start's commands from README.md and checks them against
the quoted blocks.

Usage: python docs/generate.py [NAME ...]   (default: every block; `--list` prints the names)
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)
COLUMNS = "100"  # argparse wraps --help at $COLUMNS: fixed, so the reference does not depend on the terminal

# The throughput each paper spec's GPU-hours assume: examples/s of one GPU in training, an order of magnitude for a
# current data-centre GPU, NOT a measurement (none has been made yet, see docs/benchmarks.md). For the LSTM an
# example is one stream's unroll of 35 tokens. Pass your own measured number to `harness sweep --throughput`.
THROUGHPUT = {"cifar10_wrn16_4": 5000, "cifar10_wrn16_4_skipinit": 5000, "cifar100_wrn28_10": 1000,
              "imagenet_resnet50": 2500, "ptb_lstm": 1000, "mnist_autoencoder": 50000}
PAPER_SPECS = ["fig1", "table1", "fig2", "fig3", "fig5", "fig6", "sec6_budgets", "table2", "table3", "table4",
               "table5", "table6", "fig7", "fig9", "table7", "fig8", "fig10"]


def env() -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS=COLUMNS)
    e.setdefault("OMP_NUM_THREADS", "1")  # one thread per worker either way on a 2-core machine; fixed for repeatability
    e.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    return e


def scratch() -> Path:
    """A fresh working directory in which the documented relative paths (yaml/..., data/..., runs/...) work."""
    d = Path(tempfile.mkdtemp(prefix="harness-docs-"))
    for name in ("yaml", "slurm", "docs"):
        (d / name).symlink_to(ROOT / name)
    return d


def run(command: str, cwd: Path, check: bool = True) -> str:
    """Run one documented command line (`harness ...` or `python -m launch ...`) in CWD; stdout and stderr together."""
    argv = shlex.split(command)
    if argv[0] == "harness":
        argv = [sys.executable, "-m", "harness", *argv[1:]]
    elif argv[:3] == ["python", "-m", "launch"]:
        argv = [sys.executable, *argv[1:]]
    proc = subprocess.run(argv, cwd=cwd, env=env(), capture_output=True, text=True)
    # Machine-specific paths would differ on every machine: shown as a user's shell would name them.
    out = strip_progress(proc.stdout + proc.stderr).replace(str(cwd), "$PWD").replace(sys.executable, "python")
    if check and proc.returncode != 0:
        raise SystemExit(f"docs/generate.py: `{command}` exited {proc.returncode}:\n{out}")
    return out


def strip_progress(text: str) -> str:
    """Drop tqdm bars (carriage-return redraws): they are drawn on a terminal, not part of the record."""
    return "\n".join(line for line in text.splitlines() if "\r" not in line and "it/s]" not in line
                     and "step/s" not in line and "ex/s]" not in line) + "\n"


def shown(command: str, output: str) -> str:
    return f"$ {command}\n{output.rstrip()}\n"


def fenced(text: str, lang: str = "") -> str:
    return f"```{lang}\n{text.rstrip()}\n```\n"


def table_rows(text: str) -> list[str]:
    """The Markdown table lines of a command's output (tests/test_docs.py compares them with the quoted ones)."""
    return [line for line in text.splitlines() if line.startswith("|")]


def commands(body: str) -> list[str]:
    """The `$ ...` command lines of a generated block (continuation lines ending in a backslash joined)."""
    out, cur = [], None
    for line in body.splitlines():
        if cur is not None:
            cur += " " + line.strip()
        elif line.startswith("$ "):
            cur = line[2:]
        else:
            continue
        if cur.endswith("\\"):
            cur = cur[:-1].rstrip()
        else:
            out.append(cur)
            cur = None
    return out


def blocks() -> dict[str, str]:
    """NAME -> the body currently quoted in the docs (the first occurrence)."""
    found: dict[str, str] = {}
    for path in DOCS:
        for m in BLOCK.finditer(path.read_text()):
            found.setdefault(m["name"], m["body"])
    return found


# ---- the generators: each returns the block's new body --------------------------------------------------------

def commands_block(*cmds: str, keep=None):
    """A block showing each command and what it printed (KEEP: a filter of the output, e.g. the last lines)."""
    def make(work: Path) -> str:
        text = ""
        for c in cmds:
            out = run(c, work)
            text += shown(c, keep(out) if keep else out)
        return fenced(text)
    return make


def tail(n: int):
    return lambda out: "...\n" + "\n".join(out.rstrip().splitlines()[-n:])


PROGRESS = re.compile(r"^(harness: step \d+/\d+ |sweep [\w-]+: \d+/\d+ runs done, )")


def thin_progress(out: str) -> str:
    """The output with each run of progress lines (a run's `harness: step N/M`, a sweep's `N/M runs done`) cut to
    its first and last line around a `...`: what a log shows, without ten lines of it in the docs."""
    lines, kept, run = out.splitlines(), [], []
    for line in [*lines, None]:
        if line is not None and PROGRESS.match(line):
            run.append(line)
            continue
        kept += run if len(run) <= 2 else [run[0], "...", run[-1]]
        run = []
        if line is not None:
            kept.append(line)
    return "\n".join(kept) + ("\n" if out.endswith("\n") else "")


def from_line(prefix: str):
    """The output from the first line starting with PREFIX on (the report after a long sweep's start-up lines)."""
    def keep(out: str) -> str:
        lines = out.splitlines()
        i = next((k for k, line in enumerate(lines) if line.startswith(prefix)), 0)
        return ("...\n" if i else "") + "\n".join(lines[i:])
    return keep


def demo(work: Path) -> str:
    body = commands_block("harness demo", keep=thin_progress)(work)
    shutil.copyfile(work / "runs/demo/analysis/batch_size.png", ROOT / "docs/demo_batch_size.png")
    return body


def demo_ghost_bn(work: Path) -> str:
    body = commands_block("harness demo --study ghost-bn", keep=from_line("sweep demo_ghost_bn: ran"))(work)
    shutil.copyfile(work / "runs/demo_ghost_bn/analysis/batch_size.png", ROOT / "docs/demo_ghost_bn.png")
    return body


def probe(work: Path) -> str:
    body = commands_block("harness probe yaml/digits_mlp.yaml", keep=from_line("probe yaml/"))(work)
    for png in (work / "runs").glob("probe-digits_mlp-*/probe.png"):
        shutil.copyfile(png, ROOT / "docs/probe_digits.png")
    return body


def branch(work: Path) -> str:
    trunk = ("harness train yaml/digits_mlp.yaml --run-dir runs/digits-trunk --set batch.global_batch_size=16 "
             "optim.effective_lr=0.25 budget.epochs=null budget.steps=200 checkpoint.every_steps=50 checkpoint.keep=4")
    run(trunk, work)
    body = commands_block("harness probe --branch runs/digits-trunk:50", keep=from_line("branches of"))(work)
    shutil.copyfile(work / "runs/digits-trunk-branch-50/branch.png", ROOT / "docs/branch_digits.png")
    cut = trunk.index(" budget.epochs")  # shown on two lines, as a user would type it
    return fenced(f"$ {trunk[:cut]} \\\n   {trunk[cut:]}\n" + body[len("```\n"):-len("```\n")])


def mini_fig10(work: Path) -> str:
    text = ""
    for c in ("harness sweep docs/mini_fig10.yaml --max-parallel 1",
              "harness analyze runs/mini_fig10 --export batch-science runs/mini_fig10_bs"):
        out = run(c, work)
        text += shown(c, out if "analyze" in c else tail(1)(out))
    return fenced(text)


def paper_cost(work: Path) -> str:
    """One row per experiment of the paper, from its spec's --dry-run at the assumed throughput."""
    import yaml  # the harness's own dependency; only here, so `--list` needs nothing

    rows = ["| spec | what | runs | optimizer steps | assumed examples/s per GPU | GPU-hours |", "|---|---|---:|---:|---:|---:|"]
    total = 0.0
    for name in PAPER_SPECS:
        spec = yaml.safe_load((ROOT / "yaml" / f"{name}.yaml").read_text())
        rate = THROUGHPUT[Path(spec["base"]).stem]
        out = run(f"harness sweep yaml/{name}.yaml --dry-run --throughput {rate}", work)
        runs_, steps = re.search(r"^total: ([\d,]+) runs, ([\d,]+) optimizer steps", out, re.M).groups()
        hours = re.search(r"^cost: ([\d,.]+) GPU-hours", out, re.M)[1]
        total += float(hours.replace(",", ""))
        what = out.splitlines()[1].strip()
        rows.append(f"| `yaml/{name}.yaml` | {what} | {runs_} | {steps} | {rate:,} | {hours} |")
    rows.append(f"| all | | | | | {total:,.0f} |")
    return "\n".join(rows) + "\n"


def help_block(*cmd: str):
    def make(work: Path) -> str:
        c = " ".join(cmd)
        return fenced(shown(c, run(c, work)))
    return make


GENERATORS = {
    "quickstart-convert": commands_block("harness data convert digits - data/digits"),
    "quickstart-train": commands_block("harness train yaml/digits_mlp.yaml --run-dir runs/one", keep=thin_progress),
    "quickstart-plan": commands_block("harness plan yaml/cifar10_wrn16_4.yaml --world-size 8"),
    "quickstart-demo": demo,
    "demo-ghost-bn": demo_ghost_bn,
    "demo-steps": commands_block("harness sweep yaml/demo_steps.yaml",
                                 "harness analyze runs/demo_steps --no-figures", keep=from_line("|")),
    "probe": probe,
    "branch": branch,
    "spec-table1": lambda work: fenced((ROOT / "yaml/table1.yaml").read_text(), "yaml"),
    "mini-fig10-spec": lambda work: fenced((ROOT / "docs/mini_fig10.yaml").read_text(), "yaml"),
    "mini-fig10": mini_fig10,
    "slurm-dry-run": commands_block("harness sweep yaml/table1.yaml --executor slurm --dry-run", keep=tail(2)),
    "table1-dry-run": commands_block("harness sweep yaml/table1.yaml --dry-run --throughput 5000"),
    "launch-dry-run": commands_block("python -m launch --nproc-per-node 4 --dry-run yaml/cifar10_wrn16_4.yaml "
                                     "--run-dir runs/c10"),
    "paper-cost": paper_cost,
    **{f"help-{'-'.join(c) or 'harness'}": help_block("harness", *c, "--help") for c in
       [(), ("train",), ("plan",), ("sweep",), ("analyze",), ("demo",), ("probe",), ("data", "convert"),
        ("data", "synth"), ("data", "verify")]},
    "help-launch": help_block("python", "-m", "launch", "--help"),
}
# In this order, in one scratch directory: the first quick-start command makes the shards the later ones use.
ORDER = list(GENERATORS)


def rewrite(new: dict[str, str]) -> list[str]:
    """Replace each named block's body in every doc; returns the 'file: name' of each block that changed."""
    changed = []
    for path in DOCS:
        text = path.read_text()

        def sub(m):
            if m["name"] not in new or m["body"] == new[m["name"]]:
                return m[0]
            changed.append(f"{path.relative_to(ROOT)}: {m['name']}")
            return m[1] + new[m["name"]] + m[4]

        out = BLOCK.sub(sub, text)
        if out != text:
            path.write_text(out)
    return changed


def main(argv: list[str]) -> int:
    quoted = blocks()
    if argv == ["--list"]:
        print("\n".join(ORDER))
        return 0
    unknown = sorted(set(quoted) - set(GENERATORS)) + sorted(set(argv) - set(GENERATORS))
    if unknown:
        print(f"docs/generate.py: error: no generator for block(s) {', '.join(unknown)}; known: {', '.join(ORDER)}",
              file=sys.stderr)
        return 2
    names = [n for n in ORDER if n in (argv or quoted)]
    work = scratch()
    if "quickstart-convert" not in names:  # every digits command below needs the shards
        run("harness data convert digits - data/digits", work)
    new = {}
    for name in names:
        print(f"docs/generate.py: {name} ...", flush=True)
        new[name] = GENERATORS[name](work)
    changed = rewrite(new)
    print(f"docs/generate.py: {len(names)} blocks regenerated, {len(changed)} changed"
          + "".join(f"\n  {c}" for c in changed))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
