"""`harness sweep --dry-run`: the runs, the grid, the budget rule, steps and examples per batch size, the GPU-hours
and the tasks an executor would run; nothing runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from harness.core.errors import SweepError
from harness.recipe.budget import budget_rule_of
from harness.sweep.cost import data_source, run_steps
from harness.sweep.slurm_limits import describe_arrays, plan_arrays, read_limits
from harness.sweep.state import entry, is_finished, state_dir, status
from harness.sweep.tasks import describe_packing, group_tasks


def dry_run_report(sweep, sweep_dir: Path, executor: str, max_parallel, pack: Optional[bool], throughput) -> str:
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
    if adaptive_applies(sweep):
        lines += adaptive_cost(sweep, total_examples, throughput)
    unchecked = [r for r in runs if not r.model_checked]
    if unchecked:
        lines.append(f"warning: model keys not checked, this build cannot load them: {unchecked[0].model_note}")
    if sweep.spec.search == "adaptive" and not unchecked:
        runs, note = _search_runs(sweep, sweep_dir)  # what the search runs next, not the whole grid
        lines.append(note)
    if (state_dir(sweep_dir) / "runs.json").exists() and not unchecked:
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
            pack = False if slurm.launched else pack
            tasks = group_tasks(todo, pack, sweep.spec.executor.pack_size, slurm.runs_per_task, slurm.requests_gpus)
            lines += _slurm_arrays(len(tasks), max_parallel or 16, slurm)
            lines.append(describe_packing(todo, pack, slurm.requests_gpus))
        else:
            tasks = group_tasks(todo, pack, sweep.spec.executor.pack_size, 1)
            lines.append(describe_packing(todo, pack))
            packs = sum(len(t) > 1 for t in tasks)
            lines.append(f"executor local: {len(tasks)} tasks ({packs} packs of up to {sweep.spec.executor.pack_size(runs[0].config['model']['name'])} runs) "
                         f"on {max_parallel or os.cpu_count()} workers")
    return "\n".join(lines)


def _slurm_arrays(n_tasks: int, max_parallel: int, slurm) -> list[str]:
    """How many job arrays the SLURM executor would submit, and why (the limits scontrol shows from here)."""
    limits = read_limits(slurm.extra_args)
    try:
        arrays = plan_arrays(n_tasks, limits)
    except SweepError as e:
        return [f"executor slurm: {n_tasks} array tasks; {slurm.describe()}", f"  arrays: would be refused: {e}"]
    shown = "; ".join(f"sbatch --array=0-{len(a) - 1}%{max_parallel}" for a in arrays[:3]) + ("; ..." if len(arrays) > 3 else "")
    return [f"executor slurm: {n_tasks} array tasks, at most {max_parallel} at once ({shown} slurm/sweep_array.sh ...); "
            f"{slurm.describe()}", f"  arrays: {describe_arrays(arrays, limits, max_parallel)}"]


def adaptive_cost(sweep, grid_examples: int, throughput) -> list[str]:
    """The full grid's cost beside the adaptive search's expected range (harness/sweep/search.py: cost_range)."""
    from harness.sweep.search import cost_range

    a = sweep.spec.adaptive
    how = "search: adaptive" if sweep.spec.search == "adaptive" else "search: grid; with `search: adaptive` in the spec"
    fewest, most, lo, hi = cost_range(sweep, lambda r: run_steps(r.config)[0] * r.config["batch"]["global_batch_size"])
    hours = (lambda x: f", {x / throughput / 3600:,.1f} GPU-hours") if throughput else (lambda x: "")
    return [f"{how} (window {a.window} rates, {a.seeds} seeds while locating, margin {a.margin} step(s)):",
            f"  {'':14} {'runs':>13} {'examples':>31}",
            f"  {'full grid':14} {len(sweep.runs):>13,} {grid_examples:>31,}{hours(grid_examples)}",
            f"  {'adaptive':14} {f'{fewest:,}-{most:,}':>13} {f'{lo:,.0f}-{hi:,.0f}':>31}"
            + (f", {lo / throughput / 3600:,.1f}-{hi / throughput / 3600:,.1f} GPU-hours" if throughput else "")
            + f" (typical; {100 * fewest / len(sweep.runs):.0f}-{100 * most / len(sweep.runs):.0f}% of the grid, at most all of it)"]


def adaptive_applies(sweep) -> bool:
    """Whether the spec searches adaptively, or could (then --dry-run shows what it would save)."""
    from harness.core.errors import ConfigError
    from harness.sweep.spec import check_adaptive

    try:
        check_adaptive(sweep.spec, sweep.blocks)
    except ConfigError:
        return False
    return True


def _search_runs(sweep, sweep_dir: Path) -> tuple[list, str]:
    """The runs an adaptive search runs next: its recorded rounds' unfinished runs, else the next round's."""
    from harness.sweep.search import next_round, planned_ids, read_record

    record = read_record(sweep_dir)
    ids = planned_ids(record)
    if record.get("done"):
        return [r for r in sweep.runs if r.id in ids], f"search: done after {len(record['rounds'])} rounds"
    recorded = [r for r in sweep.runs if r.id in ids]
    if recorded and not all(is_finished(r.dir(sweep_dir)) for r in recorded):
        return recorded, f"search: round {len(record['rounds'])} recorded, not finished"
    upcoming = [r for r, _ in next_round(sweep, sweep_dir, ids)[0]]
    return recorded + upcoming, f"search: round {len(record['rounds']) + 1} would run {len(upcoming)} runs"
