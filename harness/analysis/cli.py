"""`harness analyze SWEEP_DIR`: tables and figures from a sweep's run directories. Imports nothing heavy at
module level (harness/cli.py builds its parser at every start)."""

from __future__ import annotations

from pathlib import Path

from harness.core.errors import SweepError


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="tables (Markdown, CSV, LaTeX) and figures from a sweep's run directories")
    p.add_argument("sweep_dir")
    p.add_argument("--reference", help="print the paper's numbers beside ours, e.g. paper:table1")
    p.add_argument("--k", type=int, help="best k runs per cell (default: the spec's select.k, else 12)")
    p.add_argument("--n", type=int, help="runs expected per cell (default: the spec's select.n, else 15)")
    p.add_argument("--out", help="output directory (default SWEEP_DIR/analysis)")
    p.add_argument("--no-figures", action="store_true")
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args) -> int:
    from harness.analysis import tables
    from harness.analysis.select import analyze

    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        raise SweepError(f"sweep directory {sweep_dir} does not exist; run `harness sweep SPEC` first")
    a = analyze(sweep_dir, args.k, args.n)
    out = Path(args.out) if args.out else sweep_dir / "analysis"
    written = tables.write_outputs(a, out)
    print(tables.report(a))
    print(f"Selected by {a.metric}:\n")
    print(tables.to_markdown(a, "metric"))
    print("Selected by final training loss (sec. 7):\n")
    print(tables.to_markdown(a, "train_loss"))
    if args.reference:
        from harness.analysis.reference import compare

        print(compare(a, args.reference))
    if not args.no_figures:
        from harness.analysis.figures import write_figures

        written += write_figures(a, out, title=sweep_dir.name)
    print(f"wrote {', '.join(p.name for p in written)} to {out}")
    return 0
