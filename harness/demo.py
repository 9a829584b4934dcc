"""`harness demo`: a demo study end to end on embedded data: shards, the sweep (local executor), the analysis, the
figures and the TensorBoard command. It uses exactly the sweep and analysis path of a cluster study, so it sits
above both.

Two studies, both the paper's constant-epoch experiment (sec. 5, fig. 1) in miniature on CPU:
- `mlp` (the default, `make demo`): an MLP on scikit-learn's 8x8 digits (yaml/demo.yaml);
- `ghost-bn`: a 1-D CNN with ghost batch norm (sec. 3.2) on MNIST-1D (yaml/demo_ghost_bn.yaml), the demo that
  exercises ghost BN."""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

from harness.core.paths import REPO_ROOT


@dataclass(frozen=True)
class Study:
    spec: str  # under yaml/
    data_kind: str  # converted with `harness data convert KIND - DIR` when DIR has no manifest
    data: str  # default data directory
    sweep_dir: str  # default sweep directory
    title: str  # of the figures


STUDIES = {
    "mlp": Study("demo.yaml", "digits", "data/digits", "runs/demo", "demo: MLP on digits, constant epoch budget"),
    "ghost-bn": Study("demo_ghost_bn.yaml", "mnist1d", "data/mnist1d", "runs/demo_ghost_bn",
                      "demo: 1-D CNN with ghost BN on MNIST-1D, constant epoch budget"),
}


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="a demo study: batch size x lr x seed x SGD/Momentum on embedded data (CPU)")
    p.add_argument("--study", choices=list(STUDIES), default="mlp",
                   help="mlp (default): an MLP on the 8x8 digits; ghost-bn: a 1-D CNN with ghost batch norm on MNIST-1D")
    p.add_argument("--data", default=None, help="where to write the shards (default data/digits, data/mnist1d)")
    p.add_argument("--sweep-dir", default=None, help="sweep directory (default runs/demo, runs/demo_ghost_bn)")
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--max-parallel", type=int, default=None, help="worker processes (default: CPU cores)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    """The demo study end to end: shards, the sweep, the analysis and figures, TensorBoard."""
    from data_pipelines.convert import convert
    from harness.analysis import tables
    from harness.analysis.figures import write_figures
    from harness.analysis.select import analyze
    from harness.core.keys import set_dotted
    from harness.sweep.local import duration, run_sweep
    from harness.sweep.search import run_search
    from harness.sweep.spec import load_spec

    study = STUDIES[args.study]
    started = time.time()
    data = Path(args.data or study.data)
    if not (data / "manifest.json").is_file():
        convert(study.data_kind, "-", data)
    sweep = load_spec(args.spec or str(REPO_ROOT / "yaml" / study.spec))
    for r in sweep.runs:  # data.path and device are layout keys: the run ids stay the same
        set_dotted(r.config, "data.path", str(data.resolve()))
        set_dotted(r.config, "device", "cpu")
    sweep_dir = Path(args.sweep_dir or study.sweep_dir)
    print(f"demo: {sweep.spec.description.strip()}", flush=True)
    execute = run_search if sweep.spec.search == "adaptive" else run_sweep
    execute(sweep, sweep_dir, args.max_parallel or os.cpu_count() or 1, sweep.spec.executor.pack, False)
    a = analyze(sweep_dir)
    out = sweep_dir / "analysis"
    tables.write_outputs(a, out)
    figures = write_figures(a, out, title=study.title)
    print()
    print(tables.report(a))
    print(tables.to_markdown(a, "metric"))
    print(f"demo: tables in {out}/table.md|csv|tex (and table_by_train_loss.*, cells.csv)")
    print(f"demo: figures {', '.join(str(p) for p in figures if p.suffix == '.png')}")
    print(f"demo: TensorBoard (scalars of every run, HParams tab to compare them): tensorboard --logdir {sweep_dir} "
          "--port 6006, then open http://localhost:6006")
    print(f"demo: finished in {duration(time.time() - started)}")
    return 0
