"""The paper's way to the regime boundary (sec. 8): short runs on a log2 grid of eps_eff at a few batch sizes, as
an ordinary sweep (harness/sweep: a generated spec, the local executor, packs where the model allows), read back
into the largest stable rate and the optimal rate at each B.

Definitions (README "Before you buy: probe"):
- A run is STABLE when it completes without a non-finite loss and its training loss falls: both the mean training
  loss over the last floor(S/20) steps of the constant-rate phase (the steps before floor(S/2), sec. 4's schedule)
  and the final training loss (the mean over the last floor(S/20) steps) are below the initial loss: the first
  step's loss at the largest probed B (every rate and B of a seed starts from the same weights, and the smaller
  batches' first batches are parts of that one). A rate is stable at B when every seed is.
  Checking the constant phase keeps the schedule's decay from rescuing an initial rate that was not stable.
- eps_stable(B): the rate just below the first unstable rate above the optimum (the curvature edge at large B;
  at small B the noise can stop the loss from falling first, which is the noise-dominated regime showing).
- eps_opt(B): the rate with the lowest mean final training loss (the probe is about optimization speed); the
  rate with the best test metric is reported beside it.
- The boundary (sec. 3.2): in the noise-dominated regime eps_opt = T B at a fixed temperature T; in the
  curvature-dominated regime eps_opt stops growing at eps_max. T is measured at the smallest B, eps_max is the
  largest eps_opt; the boundary is where the linear-scaling line meets the plateau, B* = eps_max / T, and the rate
  to use there is eps_max. The paper's literal recipe, the largest stable rate scaled by T, gives eps_crit / T.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

from harness.core import configlib
from harness.core.errors import ConfigError
from harness.core.status import COMPLETED
from harness.sweep.spec import Sweep, SweepSpec, expand


@dataclass
class Cell:
    """One (B, eps_eff) point of the grid, over its seeds."""

    batch: int
    lr: float
    stable: bool
    final_loss: float  # mean over seeds of the final training loss; inf if any seed diverged
    phase_loss: float  # mean over seeds of the loss at the end of the constant-rate phase
    initial_loss: float  # mean over seeds of the initial loss (the first step's at the largest B)
    metric: Optional[float]  # mean test metric over seeds (None if any is missing)
    statuses: list[str] = field(default_factory=list)


@dataclass
class Row:
    """What the grid says at one batch size."""

    batch: int
    eps_opt: Optional[float]
    eps_opt_metric: Optional[float]
    eps_stable: Optional[float]
    edge_found: bool  # an unstable rate lies above the optimum on the grid
    optimum_at_bottom: bool
    cells: list[Cell]


def grid_spec(config: dict, batch_sizes: list[int], lr_log2: tuple[int, int], steps: int, seeds: list[int]) -> SweepSpec:
    """The generated sweep spec: the config at a constant step budget, every B x eps_eff x seed. Metrics every
    step (the first step's loss and the constant phase need them); no TensorBoard, no evaluation before the end."""
    overrides = {"budget.steps": steps, "budget.epochs": None, "log.every_steps": 1, "log.tensorboard": False,
                 "log.noise_scale": False, "eval.every_steps": None, "eval.every_epochs": None, "eval.train_loss": False}
    data = {"name": "probe", "base": config, "overrides": overrides, "budget_rule": "constant_steps",
            "grid": {"batch.global_batch_size": list(batch_sizes), "optim.effective_lr": {"log2": list(lr_log2)},
                     "seed": list(seeds)},
            "select": {"k": len(seeds), "n": len(seeds)}, "executor": {"pack": True, "max_pack_runs": 128}}
    return configlib.load(SweepSpec, data)


def expand_grid(config: dict, batch_sizes: list[int], lr_log2: tuple[int, int], steps: int, seeds: list[int]) -> Sweep:
    if steps < 20:
        raise ConfigError(f"probe --steps {steps}: give at least 20 (the schedule's phases are floor(S/20) steps)")
    return expand(grid_spec(config, batch_sizes, lr_log2, steps, seeds))


class RunLosses(NamedTuple):
    status: str
    first: float  # the first step's training loss (before any update)
    phase: float  # mean training loss over the last floor(S/20) steps before floor(S/2)
    final: float  # result.json train_loss; inf unless completed
    metric: Optional[float]  # the test metric


def run_losses(run_dir: Path, steps: int) -> RunLosses:
    """What the probe reads of one finished run."""
    result = json.loads((run_dir / "result.json").read_text())
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train_loss" in record:
            losses[record["step"]] = record["train_loss"]
    hold, window = steps // 2, max(1, steps // 20)
    phase = [losses[s] for s in range(hold - window + 1, hold + 1) if s in losses]
    final = result.get("train_loss")
    final = final if result["status"] == COMPLETED and final is not None else math.inf
    return RunLosses(result["status"], losses.get(1, math.nan), sum(phase) / len(phase) if phase else math.inf,
                     final, result.get(result.get("test_metric", "")))


def _finite_below(value: float, bound: float) -> bool:
    return math.isfinite(value) and math.isfinite(bound) and value < bound


def read_cells(sweep: Sweep, sweep_dir: Path, steps: int) -> list[Cell]:
    """The grid's runs as cells. The initial loss a run must get below is its seed's first-step loss at the LARGEST
    probed B: every B starts from the same weights (the seed's), and the first batch at a smaller B is the start of
    the one at the largest (global batch 0 is stream positions [0, B)), so that is the least noisy estimate."""
    runs: dict[tuple[int, float], dict[int, RunLosses]] = {}
    for run in sweep.runs:
        key = (run.point["batch.global_batch_size"], run.point["optim.effective_lr"])
        runs.setdefault(key, {})[run.point["seed"]] = run_losses(run.dir(sweep_dir), steps)
    largest = max(b for b, _ in runs)
    initial = {seed: r.first for (b, _), by_seed in runs.items() if b == largest for seed, r in by_seed.items()}
    cells = []
    for (b, lr), by_seed in sorted(runs.items()):
        at = list(by_seed.values())
        stable = all(r.status == COMPLETED and _finite_below(r.phase, initial[s]) and _finite_below(r.final, initial[s])
                     for s, r in by_seed.items())
        metrics = [r.metric for r in at]
        metric = sum(metrics) / len(metrics) if all(isinstance(m, (int, float)) for m in metrics) else None
        cells.append(Cell(b, lr, stable, _mean([r.final for r in at]), _mean([r.phase for r in at]),
                          _mean([initial[s] for s in by_seed]), metric, [r.status for r in at]))
    return cells


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if all(math.isfinite(x) for x in xs) else math.inf


def summarize(cells: list[Cell], higher_is_better: bool) -> list[Row]:
    rows = []
    for b in sorted({c.batch for c in cells}):
        at = sorted((c for c in cells if c.batch == b), key=lambda c: c.lr)
        finite = [c for c in at if math.isfinite(c.final_loss)]
        opt = min(finite, key=lambda c: c.final_loss) if finite else None
        scored = [c for c in at if c.metric is not None and math.isfinite(c.final_loss)]
        best = (max if higher_is_better else min)(scored, key=lambda c: c.metric) if scored else None
        stable, edge = None, False
        if opt is not None:
            above = [c for c in at if c.lr >= opt.lr]
            for prev, c in zip([None] + above, above):
                if not c.stable:
                    edge = True
                    stable = prev.lr if prev is not None else None
                    break
            else:
                stable = above[-1].lr if above[-1].stable else None
        rows.append(Row(b, opt.lr if opt else None, best.lr if best else None, stable, edge,
                        opt is not None and opt.lr == at[0].lr, at))
    return rows


def extension(rows: list[Row], lr_log2: tuple[int, int], room: int = 2) -> Optional[tuple[int, int]]:
    """A wider log2 range when some B has no unstable rate above its optimum (extend up) or its optimum at the
    bottom of the grid (extend down); None when the grid brackets every B."""
    lo, hi = lr_log2
    new_lo = lo - room if any(r.optimum_at_bottom for r in rows) else lo
    new_hi = hi + room if any(not r.edge_found for r in rows) else hi
    return None if (new_lo, new_hi) == (lo, hi) else (new_lo, new_hi)


@dataclass
class Boundary:
    temperature: Optional[float]  # T = eps_opt / B at the smallest B
    eps_max: Optional[float]  # the largest eps_opt (the plateau)
    eps_crit: Optional[float]  # the largest stable rate at the largest B
    b_boundary: Optional[float]  # eps_max / T
    b_paper: Optional[float]  # eps_crit / T
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def boundary(rows: list[Row]) -> Boundary:
    """Where the linear-scaling line through the smallest B's optimum meets the plateau of the optimal rate."""
    usable = [r for r in rows if r.eps_opt is not None]
    if not usable:
        return Boundary(None, None, None, None, None, ["no batch size has a run that completed: nothing to place"])
    small, large = usable[0], usable[-1]
    t = small.eps_opt / small.batch
    eps_max = max(r.eps_opt for r in usable)
    eps_crit = large.eps_stable
    notes = []
    if small.eps_opt == eps_max:
        notes.append(f"the optimum at the smallest B ({small.batch}) is already the plateau: the boundary is at or "
                     "below it; probe smaller batch sizes")
    if large.eps_opt == eps_max and len(usable) > 1 and usable[-2].eps_opt < eps_max:
        notes.append(f"the optimum still grows at the largest B ({large.batch}): the plateau, and so the boundary, "
                     "may lie beyond it; probe larger batch sizes")
    if not large.edge_found:
        notes.append(f"no unstable rate found at B = {large.batch}: eps_crit is above the grid")
    return Boundary(t, eps_max, eps_crit, eps_max / t, eps_crit / t if eps_crit is not None else None, notes)
