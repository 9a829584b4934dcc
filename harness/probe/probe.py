"""`harness probe CONFIG`: the regime boundary of a config in minutes on one node, three ways at once:
the largest stable and the optimal rate at a few B (the paper's way, sec. 8; harness/probe/regime.py), the gradient
noise scale B_simple measured online (McCandlish et al. 2018; harness/train/noise_scale.py) on one short run at
the batch size nearest the boundary, and the figure that puts them side by side (harness/probe/figures.py).

    OUT/grid/        the generated sweep (ordinary run directories; a rerun reuses every finished run)
    OUT/noise/       the B_simple run (log.noise_scale: true)
    OUT/probe.json   the report; OUT/probe.png the figure
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Optional

from harness.core import configlib
from harness.core.errors import ConfigError
from harness.probe import regime
from harness.probe.figures import probe_figure
from harness.probe.output import publish
from harness.train.config import config_hash, load_config, plan_of

STABLE = ("completes without a non-finite loss, and both its mean training loss over the last floor(S/20) steps "
          "before floor(S/2) (the end of the constant-rate phase) and its final training loss are below the initial "
          "loss (the first step's loss at the largest probed B, from the same weights); a rate is stable at B when "
          "every seed is")


def pow2(x: Optional[float]) -> str:
    """2^k for a power of two, else the number."""
    if x is None:
        return "-"
    e = math.log2(x) if x > 0 else math.nan
    return f"2^{int(e)}" if math.isfinite(e) and e == int(e) else f"{x:.4g}"


def default_batch_sizes(b: int) -> list[int]:
    return [x for x in (b // 4, b, 4 * b, 16 * b) if x >= 1]


def default_out(config_path: str, cfg) -> Path:
    return Path("runs") / f"probe-{Path(config_path).stem}-{config_hash(cfg)}"


def run_probe(config_path: str, overrides: list[str], batch_sizes: Optional[list[int]], steps: int,
              lr_range: Optional[tuple[int, int]], seeds: int, out: Optional[str], max_parallel: int,
              max_rounds: int = 3) -> dict:
    from harness.sweep.local import run_sweep

    started = time.time()
    cfg = load_config(config_path, overrides)
    batch_sizes = sorted(set(batch_sizes or default_batch_sizes(cfg.batch.global_batch_size)))
    for b in batch_sizes:  # a batch size the plan cannot lay out fails here, in one line, before any run
        cfg.batch.global_batch_size = b
        plan_of(cfg, 1)
    from harness.sweep.spec import check_data_paths

    check_data_paths([configlib.to_dict(cfg)])  # missing shards: one line now, not one failure per probe run
    out = Path(out) if out else default_out(config_path, load_config(config_path, overrides))
    centre = round(math.log2(cfg.optim.effective_lr))
    lr_log2 = tuple(lr_range) if lr_range else (centre - 5, centre + 4)
    base = configlib.to_dict(load_config(config_path, overrides))
    seed_list = [base["seed"] + i for i in range(seeds)]
    for round_ in range(max_rounds + 1):
        sweep = regime.expand_grid(base, batch_sizes, lr_log2, steps, seed_list)
        print(f"probe: {len(batch_sizes)} batch sizes x eps_eff {pow2(2.0 ** lr_log2[0])} .. {pow2(2.0 ** lr_log2[1])} "
              f"x {seeds} seed(s), {steps} steps each", flush=True)
        run_sweep(sweep, out / "grid", max_parallel, True, False)
        rows = regime.summarize(regime.read_cells(sweep, out / "grid", steps), _higher_is_better(out / "grid", sweep))
        wider = regime.extension(rows, lr_log2)
        if wider is None or round_ == max_rounds:
            break
        print(f"probe: the grid does not bracket every B (optimum at its bottom, or no unstable rate above it): "
              f"extending to {pow2(2.0 ** wider[0])} .. {pow2(2.0 ** wider[1])}", flush=True)
        lr_log2 = wider
    found = regime.boundary(rows)
    noise = noise_scale_run(base, rows, found, steps, out / "noise")
    report = {
        "config": str(config_path), "overrides": list(overrides), "optimizer": base["optim"]["name"],
        "momentum": base["optim"]["momentum"], "steps": steps, "batch_sizes": batch_sizes,
        "lr_grid_log2": list(lr_log2), "seeds": seed_list, "stable_definition": f"a run is stable when it {STABLE}",
        "rows": [_row_dict(r) for r in rows], **found.as_dict(), "b_simple": noise.get("b_simple"),
        "noise_scale": noise,
        "recommendation": {"batch_size": found.b_boundary, "effective_lr": found.eps_max},
    }
    return publish(out, "probe", report, probe_figure, text_report, started, "probe")


def _higher_is_better(sweep_dir: Path, sweep) -> bool:
    for run in sweep.runs:
        path = run.dir(sweep_dir) / "result.json"
        if path.is_file():
            return bool(json.loads(path.read_text()).get("higher_is_better", True))
    return True


def _row_dict(r: regime.Row) -> dict:
    return {"batch_size": r.batch, "eps_opt": r.eps_opt, "eps_opt_by_metric": r.eps_opt_metric,
            "eps_stable": r.eps_stable, "edge_found": r.edge_found,
            "cells": [{"effective_lr": c.lr, "stable": c.stable, "final_train_loss": _num(c.final_loss),
                       "phase_train_loss": _num(c.phase_loss), "initial_train_loss": _num(c.initial_loss),
                       "test_metric": c.metric, "statuses": c.statuses} for c in r.cells]}


def _num(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None


def noise_scale_run(base: dict, rows: list[regime.Row], found: regime.Boundary, steps: int, run_dir: Path) -> dict:
    """One run with log.noise_scale at the probed B nearest the boundary, at its optimal rate: B_simple (the EMA of
    log.noise_scale_decay, memory ~100 steps at 0.99) at the end of the constant-rate phase, where the regime is
    decided (sec. 3.4), and at the end. B_simple is a property of the weights, not of the problem: it grows as the
    loss falls (McCandlish et al. 2018, sec. 3), which is why it is read at one stated step of one stated run."""
    from harness.train.config import from_dict
    from harness.train.trainer import train

    usable = [r for r in rows if r.eps_opt is not None]
    if not usable:
        return {"b_simple": None, "note": "no batch size trained: no run to measure"}
    # The estimator of |G|^2 is noisy where B << B_simple (its noise is ~ tr(Sigma) / B): of two probed batch
    # sizes equally near the boundary, take the larger.
    target = found.b_boundary or usable[-1].batch
    row = min(usable, key=lambda r: (round(abs(math.log2(r.batch / target)), 6), -r.batch))
    config = json.loads(json.dumps(base))
    config["batch"]["global_batch_size"] = row.batch
    config["optim"]["effective_lr"] = row.eps_opt
    config["budget"] = {"steps": steps, "epochs": None}
    every = max(1, steps // 40)
    while (steps // 2) % every:  # log exactly at the end of the constant phase
        every -= 1
    config["log"].update(noise_scale=True, every_steps=every, progress=False, tensorboard=False)
    config["eval"].update(every_steps=None, every_epochs=None, train_loss=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        result = train(from_dict(config), run_dir)
    series = [(r["step"], r["b_simple"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if "b_simple" in r]
    if not series:
        return {"b_simple": None, "batch_size": row.batch, "effective_lr": row.eps_opt, "run_dir": str(run_dir),
                "note": f"not measured (see {run_dir / 'train.log'}): the layout has no batch smaller than B"}
    at_phase = dict(series).get(steps // 2)
    return {"b_simple": at_phase, "b_simple_final": result.get("b_simple"), "batch_size": row.batch,
            "effective_lr": row.eps_opt, "step": steps // 2, "ema_decay": config["log"]["noise_scale_decay"],
            "series": series, "run_dir": str(run_dir)}


def text_report(report: dict, took: str) -> str:
    lines = [f"probe {report['config']}: {report['optimizer']}, {report['steps']} steps at every B, eps_eff on "
             f"2^{report['lr_grid_log2'][0]} .. 2^{report['lr_grid_log2'][1]}, {len(report['seeds'])} seed(s); {took}",
             f"{'B':>7}  {'eps_opt (train loss)':>20}  {'eps_opt (test metric)':>21}  {'eps_stable':>10}  "
             f"{'final train loss':>16}"]
    for r in report["rows"]:
        best = next((c for c in r["cells"] if c["effective_lr"] == r["eps_opt"]), {})
        loss = best.get("final_train_loss")
        lines.append(f"{r['batch_size']:>7}  {pow2(r['eps_opt']):>20}  {pow2(r['eps_opt_by_metric']):>21}  "
                     f"{pow2(r['eps_stable']) + ('' if r['edge_found'] else '+'):>10}  "
                     f"{'-' if loss is None else f'{loss:.4f}':>16}")
    t, small = report["temperature"], report["rows"][0]["batch_size"] if report["rows"] else None
    noise = report["noise_scale"]
    lines += [
        f"noise-dominated: T = eps_opt / B = {pow2(t)} at B = {small}; curvature-dominated: eps_opt saturates at "
        f"eps_max = {pow2(report['eps_max'])}; largest stable rate at the largest B: eps_crit = {pow2(report['eps_crit'])}",
        f"boundary: B* = eps_max / T = {_b(report['b_boundary'])} (the paper's recipe, eps_crit / T = "
        f"{_b(report['b_paper'])})",
        f"B_simple = {_b(report['b_simple'])} (online, at B = {noise.get('batch_size')}, eps_eff "
        f"{pow2(noise.get('effective_lr'))}, step {noise.get('step')} of {report['steps']})"
        if report["b_simple"] is not None else f"B_simple: {noise.get('note')}",
        f"use: B = {_b(report['b_boundary'])} at eps_eff = {pow2(report['eps_max'])}",
    ]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def _b(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.0f}" if x >= 10 else f"{x:.3g}"


def check_args(steps: int, seeds: int, batch_sizes: Optional[list[int]]) -> None:
    if seeds < 1:
        raise ConfigError(f"probe --seeds {seeds}: give at least 1")
    if batch_sizes is not None and (len(batch_sizes) < 2 or min(batch_sizes) < 1):
        raise ConfigError(f"probe --batch-sizes {batch_sizes}: give two or more positive batch sizes")
