"""`harness sweep`, `harness analyze`, `harness demo` (and `harness sweep-task`, run by the SLURM array script)."""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from pathlib import Path

from harness.errors import ConfigError, SweepError, SweepStopped

ROOT = Path(__file__).resolve().parent.parent


def add_parsers(sub) -> None:
    p = sub.add_parser("sweep", help="expand a sweep spec into runs and run what is missing (local pool or SLURM array)")
    p.add_argument("spec", help="sweep spec YAML (see yaml/table1.yaml)")
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--dry-run", action="store_true", help="print the runs, the grid, the steps and the cost; run nothing")
    p.add_argument("--max-parallel", type=int, default=None,
                   help="local: worker processes (default: CPU cores); slurm: array tasks at once, %%P (default 16)")
    p.add_argument("--sweep-dir", help="where the run directories go (default runs/<spec name>)")
    p.add_argument("--throughput", type=float, help="examples/s of one GPU, for the GPU-hour estimate "
                                                    "(default: the spec's cost.examples_per_second_per_gpu)")
    p.add_argument("--no-pack", action="store_true", help="train every run on its own, never as a batched pack")
    p.add_argument("--wait", action="store_true", help="slurm: wait until the job array ends (sbatch --wait)")
    p.add_argument("-v", "--verbose", action="store_true", help="local: one line per finished run")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("sweep-task", help=argparse.SUPPRESS)  # run by slurm/sweep_array.sh
    p.add_argument("task_file")
    p.add_argument("index", type=int)
    p.set_defaults(func=cmd_sweep_task)

    p = sub.add_parser("analyze", help="tables (Markdown, CSV, LaTeX) and figures from a sweep's run directories")
    p.add_argument("sweep_dir")
    p.add_argument("--reference", help="print the paper's numbers beside ours, e.g. paper:table1")
    p.add_argument("--k", type=int, help="best k runs per cell (default: the spec's select.k, else 12)")
    p.add_argument("--n", type=int, help="runs expected per cell (default: the spec's select.n, else 15)")
    p.add_argument("--out", help="output directory (default SWEEP_DIR/analysis)")
    p.add_argument("--no-figures", action="store_true")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("demo", help="the demo study: batch size x lr x seed x SGD/Momentum on the embedded digits (CPU)")
    p.add_argument("--data", default="data/digits", help="where to write the digits shards (default data/digits)")
    p.add_argument("--sweep-dir", default="runs/demo", help="sweep directory (default runs/demo)")
    p.add_argument("--spec", default=str(ROOT / "yaml" / "demo.yaml"), help=argparse.SUPPRESS)
    p.add_argument("--max-parallel", type=int, default=None, help="worker processes (default: CPU cores)")
    p.set_defaults(func=cmd_demo)


# ---------------------------------------------------------------------------------------------- harness sweep


def cmd_sweep(args) -> int:
    from harness.sweep import load_spec

    sweep = load_spec(args.spec, allow_unchecked_models=args.dry_run)
    sweep_dir = Path(args.sweep_dir or Path("runs") / sweep.name)
    pack = sweep.spec.executor.pack and not args.no_pack
    if args.max_parallel is not None and args.max_parallel < 1:
        raise ConfigError("--max-parallel must be at least 1")
    if args.dry_run:
        print(dry_run_report(sweep, sweep_dir, args.executor, args.max_parallel, pack,
                             args.throughput or sweep.spec.cost.examples_per_second_per_gpu))
        return 0
    if args.executor == "slurm":
        return _sweep_slurm(sweep, sweep_dir, args.max_parallel or 16, pack, args.wait)
    return _sweep_local(sweep, sweep_dir, args.max_parallel or os.cpu_count() or 1, pack, args.verbose)


def _sweep_local(sweep, sweep_dir: Path, max_parallel: int, pack: bool, verbose: bool) -> int:
    from tqdm import tqdm

    from harness.executor import plan_tasks, prepare, run_local, status

    started = time.time()
    entries = prepare(sweep, sweep_dir)
    st = status(entries, sweep_dir)
    tasks = plan_tasks(st.missing, pack, sweep.spec.executor.max_pack_runs, 1)
    packs = sum(len(t) > 1 for t in tasks)
    print(f"sweep {sweep.name}: {len(entries)} runs in {sweep_dir}: {len(st.finished)} finished, "
          f"{len(st.running)} running elsewhere, {len(st.missing)} to run"
          + (f", {len(st.queued)} queued in SLURM arrays" if st.queued else "")
          + (f" ({len(tasks)} tasks, {packs} of them packs) on {min(max_parallel, max(1, len(tasks)))} worker(s)" if tasks else ""),
          flush=True)
    for e, holder in st.running[:3]:
        from harness.locks import describe

        print(f"sweep: {e['name']} is held by {describe(holder)}")
    if not tasks:
        return 0
    counts: Counter = Counter()
    bar = tqdm(total=len(st.missing), unit="run", disable=None, dynamic_ncols=True)  # a bar on a terminal only

    def report(o) -> None:
        counts[o.status] += 1
        if o.status not in ("finished-before", "locked"):
            bar.update(1)
        if verbose or o.status == "failed":
            value = f" {o.metric_name} {o.metric:.4g}" if o.metric is not None else ""
            tqdm.write(f"sweep: {o.name}: {o.status}{value}{(' ' + o.detail) if o.detail else ''}")

    try:
        local = run_local(sweep_dir, tasks, max_parallel, pack, report)
    finally:
        bar.close()
    ran = counts["completed"] + counts["diverged"] + counts["failed"] + counts["interrupted"]
    print(f"sweep {sweep.name}: ran {ran} runs in {_duration(time.time() - started)}: {counts['completed']} completed, "
          f"{counts['diverged']} diverged, {counts['failed']} failed"
          + (f", {counts['interrupted']} interrupted" if counts["interrupted"] else "")
          + (f"; skipped {counts['locked']} held by another executor" if counts["locked"] else "")
          + (f", {counts['finished-before']} finished meanwhile" if counts["finished-before"] else ""), flush=True)
    if counts["failed"]:
        raise SweepError(f"{counts['failed']} runs failed (see <run dir>/error.txt and {sweep_dir}/.sweep/history.jsonl); "
                         "fix the cause and run the same command again: it runs only what is missing or failed")
    if local.stopped_by:
        raise SweepStopped(f"sweep {sweep.name} stopped by {local.stopped_by}: {counts['interrupted']} runs interrupted, "
                           f"{len(st.missing) - len(local.outcomes)} not started; run the same command again: "
                           "interrupted runs resume from their checkpoint (packed runs start over)")
    return 0


def _sweep_slurm(sweep, sweep_dir: Path, max_parallel: int, pack: bool, wait: bool) -> int:
    from harness.executor import (launch_settings, plan_tasks, prepare, record_submission, sbatch_command, status,
                                  submit_slurm, write_task_file)

    entries = prepare(sweep, sweep_dir)
    st = status(entries, sweep_dir)
    launch = launch_settings(sweep.spec.slurm)
    pack = pack and launch is None  # a launched run has processes of its own
    tasks = plan_tasks(st.missing, pack, sweep.spec.executor.max_pack_runs, sweep.spec.slurm.runs_per_task)
    print(f"sweep {sweep.name}: {len(entries)} runs in {sweep_dir}: {len(st.finished)} finished, "
          f"{len(st.running)} running, {len(st.queued)} queued in earlier arrays, {len(st.missing)} to run", flush=True)
    if not tasks:
        return 0
    task_file = write_task_file(sweep_dir, tasks, pack, launch)
    print(f"sweep: {sweep.spec.slurm.describe()}", flush=True)
    cmd = sbatch_command(sweep.name, sweep_dir, task_file, len(tasks), max_parallel, sweep.spec.slurm, wait)
    print("sweep: " + " ".join(cmd), flush=True)
    if wait:  # sbatch --wait returns at the end; record the array first so a parallel resubmission sees it
        print(f"sweep {sweep.name}: waiting for the job array ({len(tasks)} tasks, at most {max_parallel} at once)", flush=True)
    job = submit_slurm(cmd, on_job=lambda j: record_submission(sweep_dir, j, task_file))
    print(f"sweep {sweep.name}: submitted job array {job}: {len(tasks)} tasks, at most {max_parallel} at once; "
          f"logs in {sweep_dir}/.sweep/slurm/; watch: squeue -j {job}; "
          f"afterwards: harness analyze {sweep_dir} (run the same sweep command again to fill in what is missing)")
    return 0


def cmd_sweep_task(args) -> int:
    from harness.executor import run_task_file

    outcomes = run_task_file(Path(args.task_file), args.index)
    counts = Counter(o.status for o in outcomes)
    print("sweep-task: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), flush=True)
    if counts["failed"]:
        raise SweepError(f"{counts['failed']} runs of array task {args.index} failed (see error.txt in their run directories)")
    return 0


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s" if seconds >= 60 else f"{seconds:.1f}s"


# ---------------------------------------------------------------------------------------------- dry run


def dry_run_report(sweep, sweep_dir: Path, executor: str, max_parallel, pack: bool, throughput) -> str:
    from harness.executor import plan_tasks, state_dir, status
    from harness.sweep import budget_rule_of, data_source, run_steps

    runs = sweep.runs
    lines = [f"sweep {sweep.name}" + (f" ({sweep.spec_path})" if sweep.spec_path else "") + f": {len(runs)} runs"
             + (f" ({sweep.dropped} grid points dropped by constraints)" if sweep.dropped else "")
             + (f" ({sweep.duplicates} duplicate grid points)" if sweep.duplicates else "")]
    if sweep.spec.description:
        lines.append(f"  {sweep.spec.description.strip()}")
    lines.append("grid:")
    for i, block in enumerate(sweep.blocks):
        if len(sweep.blocks) > 1:
            lines.append(f"  block {i + 1}:")
        for axis in block:
            lines.append(f"  {'  ' if len(sweep.blocks) > 1 else ''}{axis.key}: {axis.describe()}")
    rule = budget_rule_of(runs)
    lines.append(f"budget rule: {rule}" + (" (declared)" if sweep.spec.budget_rule else " (inferred)"))
    sel = sweep.spec.select
    lines.append(f"selection: best {sel.k} of {sel.n} runs per (optimizer, batch size, lr)")
    lines.append(f"data: {runs[0].config['data']['name']}: {data_source(runs[0].config)}")
    per: dict = {}
    total_steps = total_examples = 0
    for r in runs:
        steps, epochs = run_steps(r.config)
        b = r.config["batch"]["global_batch_size"]
        row = per.setdefault((b, steps), [0, epochs])
        row[0] += 1
        total_steps += steps
        total_examples += steps * b
    lines.append(f"  {'B':>7} {'runs':>6} {'steps/run':>10} {'epochs/run':>10} {'examples':>14}")
    for (b, steps), (count, epochs) in sorted(per.items()):
        lines.append(f"  {b:>7} {count:>6} {steps:>10} {epochs:>10.4g} {count * steps * b:>14,}")
    lines.append(f"total: {len(runs)} runs, {total_steps:,} optimizer steps, {total_examples:,} training examples")
    if throughput:
        lines.append(f"cost: {total_examples / throughput / 3600:,.1f} GPU-hours at {throughput:g} examples/s per GPU "
                     "(training only; evaluation not counted)")
    else:
        lines.append("cost: pass --throughput EXAMPLES_PER_S (one GPU's training throughput) for GPU-hours")
    unchecked = [r for r in runs if not r.model_checked]
    if unchecked:
        lines.append(f"warning: model keys not checked, this build cannot load them: {unchecked[0].model_note}")
    if (state_dir(sweep_dir) / "runs.json").exists() and not unchecked:
        from harness.executor import entry

        entries = [entry(r, sweep.axis_keys) for r in runs]
        st = status(entries, sweep_dir)
        todo = st.missing
        lines.append(f"sweep dir {sweep_dir}: {len(st.finished)} finished, {len(st.running)} running, {len(todo)} to run")
    else:
        todo = [{"config": r.config} for r in runs] if not unchecked else []
        lines.append(f"sweep dir {sweep_dir}: not started")
    if todo:
        if executor == "slurm":
            slurm = sweep.spec.slurm
            tasks = plan_tasks(todo, pack and not slurm.launched, sweep.spec.executor.max_pack_runs, slurm.runs_per_task)
            lines.append(f"executor slurm: {len(tasks)} array tasks, at most {max_parallel or 16} at once "
                         f"(sbatch --array=0-{len(tasks) - 1}%{max_parallel or 16} slurm/sweep_array.sh ...); "
                         f"{slurm.describe()}")
        else:
            tasks = plan_tasks(todo, pack, sweep.spec.executor.max_pack_runs, 1)
            packs = sum(len(t) > 1 for t in tasks)
            lines.append(f"executor local: {len(tasks)} tasks ({packs} packs of up to {sweep.spec.executor.max_pack_runs} runs) "
                         f"on {max_parallel or os.cpu_count()} workers")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- harness analyze


def cmd_analyze(args) -> int:
    from harness import analysis

    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        raise SweepError(f"sweep directory {sweep_dir} does not exist; run `harness sweep SPEC` first")
    a = analysis.analyze(sweep_dir, args.k, args.n)
    out = Path(args.out) if args.out else sweep_dir / "analysis"
    written = analysis.write_outputs(a, out)
    print(analysis.report(a))
    print(f"Selected by {a.metric}:\n")
    print(analysis.to_markdown(a, "metric"))
    print("Selected by final training loss (sec. 7):\n")
    print(analysis.to_markdown(a, "train_loss"))
    if args.reference:
        print(analysis.compare(a, args.reference))
    if not args.no_figures:
        from harness.figures import write_figures

        written += write_figures(a, out, title=sweep_dir.name)
    print(f"wrote {', '.join(p.name for p in written)} to {out}")
    return 0


# ---------------------------------------------------------------------------------------------- harness demo


def cmd_demo(args) -> int:
    """The demo study end to end: digits shards, the sweep, the analysis and figures, TensorBoard."""
    from data_pipelines.convert import convert_digits
    from harness import analysis
    from harness.figures import write_figures
    from harness.configlib import set_dotted
    from harness.sweep import load_spec

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
    _sweep_local(sweep, sweep_dir, args.max_parallel or os.cpu_count() or 1, sweep.spec.executor.pack, False)
    a = analysis.analyze(sweep_dir)
    out = sweep_dir / "analysis"
    written = analysis.write_outputs(a, out)
    figures = write_figures(a, out, title="demo: MLP on digits, constant epoch budget")
    print()
    print(analysis.report(a))
    print(analysis.to_markdown(a, "metric"))
    print(f"demo: tables in {out}/table.md|csv|tex (and table_by_train_loss.*, cells.csv)")
    print(f"demo: figures {', '.join(str(p) for p in figures if p.suffix == '.png')}")
    print(f"demo: TensorBoard (scalars of every run, HParams tab to compare them): tensorboard --logdir {sweep_dir} "
          "--port 6006, then open http://localhost:6006")
    print(f"demo: finished in {_duration(time.time() - started)}")
    return 0
