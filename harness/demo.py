"""`harness demo`: the demo study end to end on the embedded digits: shards, the sweep (local executor), the
analysis, the figures and the TensorBoard command. It uses exactly the sweep and analysis path of a cluster
study, so it sits above both."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from harness.core.paths import REPO_ROOT


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the demo study: batch size x lr x seed x SGD/Momentum on the embedded digits (CPU)")
    p.add_argument("--data", default="data/digits", help="where to write the digits shards (default data/digits)")
    p.add_argument("--sweep-dir", default="runs/demo", help="sweep directory (default runs/demo)")
    p.add_argument("--spec", default=str(REPO_ROOT / "yaml" / "demo.yaml"), help=argparse.SUPPRESS)
    p.add_argument("--max-parallel", type=int, default=None, help="worker processes (default: CPU cores)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    """The demo study end to end: digits shards, the sweep, the analysis and figures, TensorBoard."""
    from data_pipelines.convert import convert_digits
    from harness.analysis import tables
    from harness.analysis.figures import write_figures
    from harness.analysis.select import analyze
    from harness.core.keys import set_dotted
    from harness.sweep.local import duration, run_sweep
    from harness.sweep.spec import load_spec

    started = time.time()
    data = Path(args.data)
    if not (data / "manifest.json").is_file():
        convert_digits(data)
    sweep = load_spec(args.spec)
    for r in sweep.runs:  # data.path and device are layout keys: the run ids stay the same
        set_dotted(r.config, "data.path", str(data.resolve()))
        set_dotted(r.config, "device", "cpu")
    sweep_dir = Path(args.sweep_dir)
    print(f"demo: {sweep.spec.description.strip()}", flush=True)
    run_sweep(sweep, sweep_dir, args.max_parallel or os.cpu_count() or 1, sweep.spec.executor.pack, False)
    a = analyze(sweep_dir)
    out = sweep_dir / "analysis"
    tables.write_outputs(a, out)
    figures = write_figures(a, out, title="demo: MLP on digits, constant epoch budget")
    print()
    print(tables.report(a))
    print(tables.to_markdown(a, "metric"))
    print(f"demo: tables in {out}/table.md|csv|tex (and table_by_train_loss.*, cells.csv)")
    print(f"demo: figures {', '.join(str(p) for p in figures if p.suffix == '.png')}")
    print(f"demo: TensorBoard (scalars of every run, HParams tab to compare them): tensorboard --logdir {sweep_dir} "
          "--port 6006, then open http://localhost:6006")
    print(f"demo: finished in {duration(time.time() - started)}")
    return 0
