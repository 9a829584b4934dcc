"""`harness probe --branch RUN_DIR[:STEP]`: the critical batch size by branching (Merrill et al. 2025, "Critical
Batch Size Revisited"): from one checkpoint of an existing run, short continuations at B' = k B with the
effective rate scaled by k (the linear scaling rule, sec. 3.2), each counting the steps until a loss reaches a
target. In the noise-dominated regime the steps fall as 1/k (the same temperature, k times the examples per
step); B_crit is the largest B' whose steps stay within `tolerance` (20%) of perfect scaling, for every k up to it.

- The trunk's schedule is a function of ITS total steps; a branch cannot keep it, so every branch runs at a
  CONSTANT rate, k times the trunk's rate at STEP (schedule.decay_factor 1), for a fixed cap of steps.
- Each branch is an ordinary run directory (OUT/branches/...): the checkpoint is COPIED into it, and the trainer
  resumes from it exactly (weights, momentum buffer, RNG; checkpoints resume at any batch plan). The data stream
  continues at position STEP x B' of the run's example order, so branches see different, equally random batches.
- The loss is the evaluation metric (`--metric`, default test_loss: on the noisy quadratic exactly 1/2 w^T H w),
  evaluated every `--eval-every` steps; the first passage below the target is interpolated linearly between two
  evaluations. The default target lies half-way between the k = 1 branch's loss at its start and at its end (the
  means of its first and last tenth of evaluations): below the start, above the noise floor. Branch before the
  loss reaches its floor at the trunk's temperature, or there is no progress to count.
- Each branch runs once per seed (`--seeds`, default 3): the seed sets the data order after the branch point (the
  weights come from the checkpoint); steps to target are the mean over seeds.
- The k = 1 branch (first seed) also measures B_simple online (log.noise_scale), reported beside B_crit.
- Caveat: B_crit is measured at the trunk's temperature T = eps / B. It marks the boundary when the trunk's rate is
  near the optimum for its B (as after `harness probe`); at a too-cold trunk it comes out larger.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Optional

from harness.core import configlib
from harness.core.errors import CheckpointError, ConfigError
from harness.core.status import COMPLETED
from harness.probe.figures import branch_figure
from harness.probe.output import publish
from harness.sweep.spec import SweepSpec, expand

PATTERN = "step-{:08d}.pt"


def parse_target(text: str) -> tuple[Path, Optional[int]]:
    """RUN_DIR or RUN_DIR:STEP."""
    head, sep, tail = text.rpartition(":")
    if sep and tail.isdigit():
        return Path(head), int(tail)
    return Path(text), None


def find_checkpoint(run_dir: Path, step: Optional[int]) -> tuple[Path, int]:
    """The trunk's checkpoint at STEP (default: its newest step checkpoint)."""
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"probe --branch {run_dir}: not a run directory (no config.yaml); give RUN_DIR[:STEP] of a "
                          "run made by `harness train`")
    found = sorted(int(p.name[5:13]) for p in (run_dir / "checkpoints").glob("step-*.pt")) \
        if (run_dir / "checkpoints").is_dir() else []
    if not found:
        raise CheckpointError(f"probe --branch: {run_dir}/checkpoints has no step-XXXXXXXX.pt; train the trunk with "
                              "--set checkpoint.every_steps=N checkpoint.keep=K to keep some")
    step = found[-1] if step is None else step
    if step not in found:
        raise CheckpointError(f"probe --branch: {run_dir} has no checkpoint at step {step}; it has steps "
                              f"{', '.join(map(str, found))}")
    return run_dir / "checkpoints" / PATTERN.format(step), step


def trunk_rate(config: dict, step: int) -> float:
    """The trunk's eps_eff at `step`, from its own schedule."""
    from data_pipelines import describe as describe_data
    from harness.recipe.schedule import Schedule
    from harness.train.config import durations_of, from_dict

    cfg = from_dict(config)
    spec, _ = describe_data(cfg.data.name, cfg.data.path)
    total = durations_of(cfg, spec).total_steps
    return Schedule.of(cfg.optim.effective_lr, cfg.schedule.decay_factor, cfg.schedule.final_lr, total,
                       cfg.schedule.warmup_steps).at(step)


def branch_spec(config: dict, step: int, rate: float, ks: list[int], cap: int, eval_every: int,
                seeds: list[int]) -> SweepSpec:
    b = config["batch"]["global_batch_size"]
    overrides = {"schedule.decay_factor": 1.0, "schedule.final_lr": None, "schedule.warmup_steps": 0,
                 "budget.steps": step + cap, "budget.epochs": None, "eval.every_steps": eval_every,
                 "eval.every_epochs": None, "eval.train_loss": False, "log.every_steps": eval_every,
                 "log.tensorboard": False, "log.noise_scale": False, "checkpoint.every_steps": None,
                 "checkpoint.every_epochs": None}
    grid = [{"batch.global_batch_size": [k * b], "optim.effective_lr": [k * rate], "seed": list(seeds),
             **({"log.noise_scale": [True]} if k == 1 else {})} for k in ks]
    return configlib.load(SweepSpec, {"name": "branch", "base": config, "overrides": overrides, "grid": grid,
                                      "select": {"k": len(seeds), "n": len(seeds)}, "executor": {"pack": False}})


def first_passage(records: list[tuple[int, float]], target: float) -> Optional[float]:
    """Steps (from the branch point) until the metric first reaches <= target, interpolated between evaluations."""
    prev = None
    for s, v in records:
        if math.isfinite(v) and v <= target:
            if prev is None or not math.isfinite(prev[1]) or prev[1] == v:
                return float(s)
            return prev[0] + (s - prev[0]) * (prev[1] - target) / (prev[1] - v)
        prev = (s, v)
    return None


def branch_records(run_dir: Path, metric: str, step: int) -> list[tuple[int, float]]:
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if metric in r and r["step"] > step:
            records.append((r["step"] - step, float(r[metric]) if r[metric] is not None else math.nan))
    return records


def default_target(records: list[tuple[int, float]]) -> float:
    """Half-way from the loss at the branch point to where the k = 1 branch ends: the mean of its first and of its
    last tenth of evaluations. A target near the end would sit in the noise floor (the same for every branch: the
    same temperature), reached by a fluctuation rather than by progress."""
    n = max(1, len(records) // 10)
    start = sum(v for _, v in records[:n]) / n
    end = sum(v for _, v in records[-n:]) / n
    return start - 0.5 * (start - end)


def critical_batch(rows: list[dict], tolerance: float) -> tuple[Optional[int], bool]:
    """(B_crit, whether a branch broke the rule): the largest B' = k B whose steps to target are at most
    (1 + tolerance) S(B) / k, for it and every smaller k."""
    base = next((r for r in rows if r["k"] == 1), None)
    if base is None or not base["steps_to_target"]:
        return None, False
    best = None
    for r in sorted(rows, key=lambda r: r["k"]):
        s = r["steps_to_target"]
        if s is None or s > (1 + tolerance) * base["steps_to_target"] / r["k"]:
            return best, True
        best = r["batch_size"]
    return best, False


def run_branches(target: str, ks: list[int], cap: int, metric: str, loss_target: Optional[float], tolerance: float,
                 eval_every: Optional[int], out: Optional[str], max_parallel: int, seeds: int = 3) -> dict:
    from harness.sweep.local import run_sweep

    started = time.time()
    run_dir, step = parse_target(target)
    checkpoint, step = find_checkpoint(run_dir, step)
    ks = sorted(set(ks) | {1})
    if cap < 4 or tolerance <= 0:
        raise ConfigError(f"probe --branch: give --steps >= 4 and --tolerance > 0 (got {cap}, {tolerance})")
    config = configlib.load_yaml_text((run_dir / "config.yaml").read_text())
    rate = trunk_rate(config, step)
    b = config["batch"]["global_batch_size"]
    eval_every = eval_every or max(1, cap // 400)
    seed_list = [config["seed"] + i for i in range(seeds)]
    sweep = expand(branch_spec(config, step, rate, ks, cap, eval_every, seed_list))
    out = Path(out) if out else run_dir.parent / f"{run_dir.name}-branch-{step}"
    for run in sweep.runs:  # copy, never move: the trunk stays whole
        dest = run.dir(out / "branches") / "checkpoints"
        if not (run.dir(out / "branches") / "result.json").exists() and not list(dest.glob("step-*.pt")):
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(checkpoint, dest / checkpoint.name)
    print(f"probe --branch: {len(ks)} branches from {checkpoint} (B = {b}, eps_eff {rate:.4g} at step {step}): "
          f"B' = {', '.join(str(k * b) for k in ks)} at eps_eff x k, constant, {cap} steps each, {seeds} data "
          "order(s) (seeds)", flush=True)
    run_sweep(sweep, out / "branches", max_parallel, False, False)
    report = _report(sweep, out / "branches", run_dir, step, b, rate, ks, cap, metric, loss_target, tolerance)
    return publish(out, "branch", report, branch_figure, text_report, started, "probe --branch")


def _report(sweep, sweep_dir: Path, run_dir: Path, step: int, b: int, rate: float, ks: list[int], cap: int,
            metric: str, loss_target: Optional[float], tolerance: float) -> dict:
    """Steps to target per branch: the mean over its seeds (None if a seed never reached it)."""
    runs: dict[int, list] = {}
    for run in sweep.runs:
        runs.setdefault(run.point["batch.global_batch_size"] // b, []).append(run)
    series = {(k, i): branch_records(r.dir(sweep_dir), metric, step) for k in ks for i, r in enumerate(runs[k])}
    base = [series[(1, i)] for i in range(len(runs[1]))]
    if not all(base):
        raise ConfigError(f"probe --branch: the k = 1 branch logged no {metric!r}; pick --metric from its evaluation "
                          f"records (e.g. test_loss) in {runs[1][0].dir(sweep_dir) / 'metrics.jsonl'}")
    if loss_target is None:
        loss_target = sum(default_target(s) for s in base) / len(base)
    rows = []
    for k in ks:
        passages, statuses = [], []
        for i, run in enumerate(runs[k]):
            result = json.loads((run.dir(sweep_dir) / "result.json").read_text())
            records = series[(k, i)]
            if result["status"] != COMPLETED:  # what it reached before diverging still counts
                records = [(s, v) for s, v in records if s < (result.get("diverged_at_step") or 0) - step]
            passages.append(first_passage(records, loss_target))
            statuses.append(result["status"])
        reached = sum(passages) / len(passages) if all(p is not None for p in passages) else None
        rows.append({"k": k, "batch_size": k * b, "effective_lr": k * rate, "status": "/".join(sorted(set(statuses))),
                     "steps_to_target": reached, "per_seed": passages, "run_dirs": [str(r.dir(sweep_dir)) for r in runs[k]]})
    b_crit, broke = critical_batch(rows, tolerance)
    noise = [json.loads(line) for line in (runs[1][0].dir(sweep_dir) / "metrics.jsonl").read_text().splitlines()]
    noise = [(r["step"] - step, r["b_simple"]) for r in noise if "b_simple" in r]
    # The EMA (decay 0.99) remembers ~100 steps: read it no earlier than that, and not before the target.
    settle = min(cap, max(rows[0]["steps_to_target"] or cap, 100))
    b_simple = next((v for s, v in noise if s >= settle), noise[-1][1] if noise else None)
    notes = [] if broke else [f"every branch up to B' = {ks[-1] * b} scaled within {100 * tolerance:.0f}%: B_crit is "
                              "at least that; add larger --k"]
    return {"run_dir": str(run_dir), "step": step, "batch_size": b, "effective_lr": rate, "k": ks, "cap": cap,
            "seeds": len(runs[1]), "metric": metric, "target": loss_target, "tolerance": tolerance, "rows": rows,
            "b_crit": b_crit, "b_simple": b_simple, "b_simple_step": settle, "b_simple_series": noise, "notes": notes,
            "schedule": "constant eps_eff = k x the trunk's rate at the branch step (schedule.decay_factor 1)"}


def text_report(report: dict, took: str) -> str:
    lines = [f"branches of {report['run_dir']} at step {report['step']}: target {report['metric']} <= "
             f"{report['target']:.4g}; {took}",
             f"{'k':>4}  {'B_prime':>7}  {'eps_eff':>9}  {'status':>9}  {'steps to target':>15}  {'x perfect':>9}"]
    base = report["rows"][0]["steps_to_target"]
    for r in report["rows"]:
        s = r["steps_to_target"]
        ratio = f"{s * r['k'] / base:.2f}" if s and base else "-"
        lines.append(f"{r['k']:>4}  {r['batch_size']:>7}  {r['effective_lr']:>9.4g}  {r['status']:>9}  "
                     f"{'-' if s is None else f'{s:.1f}':>15}  {ratio:>9}")
    lines.append(f"B_crit = {report['b_crit']} (largest B' within {100 * report['tolerance']:.0f}% of perfect 1/k "
                 f"scaling); B_simple = {report['b_simple']:.0f} (online, k = 1 branch, {report['b_simple_step']} "
                 "steps after the branch point)"
                 if report["b_simple"] is not None else f"B_crit = {report['b_crit']}")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
