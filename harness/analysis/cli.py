"""`harness analyze SWEEP_DIR`: tables and figures from a sweep's run directories (or from a batch-science
export), and `--export batch-science DIR`. Imports nothing heavy at module level (harness/cli.py builds its
parser at every start)."""

from __future__ import annotations

import sys
from pathlib import Path

from harness.core.errors import SweepError

EXPORT_FORMATS = ("batch-science",)


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="tables (Markdown, CSV, LaTeX) and figures from a sweep's run directories")
    p.add_argument("sweep_dir", help="a sweep directory (run directories below it), or a batch-science export")
    p.add_argument("--reference", help="print the paper's numbers beside ours, e.g. paper:table1")
    p.add_argument("--k", type=int, help="best k runs per cell (default: the spec's select.k, else 12)")
    p.add_argument("--n", type=int, help="runs expected per cell (default: the spec's select.n, else 15)")
    p.add_argument("--out", help="output directory (default SWEEP_DIR/analysis)")
    p.add_argument("--no-figures", action="store_true", help="write the tables only (no PNG/SVG figures; faster, no matplotlib)")
    p.add_argument("--train-loss", choices=("window", "train_set"), default="window",
                   help="the final training loss: window = mean train-mode minibatch loss over the last S/20 steps "
                        "(result.json train_loss, default); train_set = the full training set in eval mode at the "
                        "end (train_set_loss, runs with eval.train_loss: true)")
    p.add_argument("--curves-lr", metavar="A,B",
                   help="curves.png: these effective learning rates (default: the optima by test metric and by "
                        "training loss at the largest epoch budget)")
    p.add_argument("--export", nargs=2, metavar=("FORMAT", "DIR"),
                   help="also write the runs to DIR in another layout; FORMAT: batch-science (Shallue et al.)")
    p.set_defaults(func=cmd_analyze)


def warn(line: str) -> None:
    print(f"harness: warning: {line}", file=sys.stderr, flush=True)


def plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def cmd_analyze(args) -> int:
    from harness.analysis import tables
    from harness.analysis.curves import parse_rates
    from harness.analysis.select import TRAIN_LOSS_LABELS, analyze

    sweep_dir = Path(args.sweep_dir)
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise SweepError(f"{sweep_dir} is a file, not a sweep directory; pass the directory that holds the run "
                         "directories (e.g. runs/<spec name>)")
    if not sweep_dir.is_dir():
        raise SweepError(f"sweep directory {sweep_dir} does not exist; run `harness sweep SPEC` first")
    if args.export and args.export[0] not in EXPORT_FORMATS:
        raise SweepError(f"--export {args.export[0]!r}: unknown format; expected one of {', '.join(EXPORT_FORMATS)}")
    if args.reference:  # before the analysis prints anything
        from harness.analysis.reference import reference_table

        reference_table(args.reference)
    rates = parse_rates(args.curves_lr) if args.curves_lr else None
    a = analyze(sweep_dir, args.k, args.n, args.train_loss, echo=warn)
    out = Path(args.out) if args.out else sweep_dir / "analysis"
    written = tables.write_outputs(a, out)
    print(tables.report(a))
    print(f"Selected by {a.metric}:\n")
    print(tables.to_markdown(a, "metric"))
    print(f"Selected by final training loss ({TRAIN_LOSS_LABELS[a.train_loss_source]}; sec. 7):\n")
    print(tables.to_markdown(a, "train_loss"))
    if args.reference:
        from harness.analysis.reference import compare

        print(compare(a, args.reference))
    if args.export:
        from harness.analysis.batch_science_export import export

        counts = export(a, sweep_dir, Path(args.export[1]), echo=warn)
        print(f"exported {len(a.records)} trials ({counts['COMPLETE']} COMPLETE, {counts['INFEASIBLE']} INFEASIBLE, "
              f"{counts['INCOMPLETE']} INCOMPLETE) in {plural(counts['studies'], 'study', 'studies')} to {args.export[1]} (batch-science)")
    if not args.no_figures:
        from harness.analysis.figures import write_figures

        from harness.analysis.runs import title_of

        written += write_figures(a, out, title=title_of(sweep_dir), curves_lr=rates)
        if rates and not any(p.stem == "curves" for p in written):
            print("no curves.png: the runs of those rates have no evaluations during training (eval.every_epochs)")
    print(f"wrote {', '.join(p.name for p in written)} to {out}")
    return 0
