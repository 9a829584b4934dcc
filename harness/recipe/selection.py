"""The paper's statistics (sec. 4): the best k of n runs per cell, the optimal learning rate, its error bar, and
the grid-edge check, as pure functions of numbers.

- Per cell (one learning rate, its n seeds): the best k runs by the criterion; their mean and sample standard
  deviation (ddof 1; 0 for a single run), and the mean and std of the other quantity (the final training loss
  when selecting by the test metric, and vice versa) over the same k runs. A run without a finite value (a
  diverged run) counts as the worst value: if it falls among the best k, the cell's mean is the worst possible
  and the cell cannot be optimal.
- Per group of cells (every learning rate of one optimizer and batch size): the optimal rate is the cell with
  the best mean (ties: the smaller rate); its error bar is every rate whose mean lies within one standard
  deviation (of the optimal cell) of the optimal mean; the grid must be extended when the optimum or its error
  bar touches the edge of the group's grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from harness.core.configlib import positive
from harness.core.errors import ConfigError


@dataclass
class Selection:
    """`select:` of a sweep spec: keep the best k of the n runs (seeds) of each (optimizer, B, lr) cell.
    Sec. 4: 12 of 15 for the Wide-ResNets (the default); 5 of 7 for the LSTM, the autoencoder and sec. 7.1;
    1 of 1 for ResNet-50."""

    k: int = positive(12)
    n: int = positive(15)

    def validate(self, path: str) -> None:
        if self.k > self.n:
            raise ConfigError(f"spec key {path}: k ({self.k}) must not exceed n ({self.n})")


@dataclass
class Stats:
    """Best k of a cell's runs by one criterion."""

    k: int
    mean: float
    std: float
    other_mean: float  # the other quantity (train loss / metric) over the same k runs
    other_std: float
    diverged_in_best: bool


def sample_std(values: Sequence[float]) -> float:
    if any(not math.isfinite(v) for v in values):
        return math.nan
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def best_k(values: Sequence[Optional[float]], others: Sequence[Optional[float]], k: int, higher: bool) -> Optional[Stats]:
    """Mean and std of the best k of a cell's finished runs by `values` (None or non-finite: the worst value),
    with `others` (the other quantity of the same runs) averaged over the same k. None for no finished run.
    Equal values keep the runs' order, so the choice is deterministic."""
    if not values:
        return None
    worst = -math.inf if higher else math.inf
    scored = [(v if v is not None and math.isfinite(v) else worst, i) for i, v in enumerate(values)]
    scored.sort(key=lambda t: (-t[0] if higher else t[0], t[1]))
    chosen = scored[:k]
    vals = [v for v, _ in chosen]
    other = [others[i] if others[i] is not None else math.nan for _, i in chosen]
    diverged = any(math.isinf(v) for v in vals)
    mean = worst if diverged else sum(vals) / len(vals)
    return Stats(len(chosen), mean, sample_std(vals), sum(other) / len(other), sample_std(other), diverged)


@dataclass
class OptimalRate:
    index: int  # which candidate is optimal
    low: tuple  # per learning-rate key: the lowest rate in the error bar
    high: tuple
    bar: list[tuple]  # the rates inside the error bar
    edge: str  # "" or which grid edges the optimum / error bar touch, e.g. "low", "high", "final_lr low+high"


def optimum(rates: Sequence[tuple], stats: Sequence[Optional[Stats]], higher: bool, names: Sequence[str]) -> Optional[OptimalRate]:
    """The optimal rate among cells with learning rates `rates` (one tuple per cell: a value per key in `names`)
    and best-k `stats`, its one-std error bar and the grid-edge check. None when no cell has a finite mean."""
    scored = [i for i, s in enumerate(stats) if s is not None and math.isfinite(s.mean)]
    if not scored:
        return None
    best = sorted(scored, key=lambda i: (-stats[i].mean if higher else stats[i].mean, rates[i]))[0]
    s = stats[best]
    spread = s.std if math.isfinite(s.std) else 0.0
    bar = sorted(rates[i] for i in scored if abs(stats[i].mean - s.mean) <= spread)
    low = tuple(min(lr[j] for lr in bar) for j in range(len(names)))
    high = tuple(max(lr[j] for lr in bar) for j in range(len(names)))
    return OptimalRate(best, low, high, bar, grid_edges(rates, rates[best], low, high, names))


def grid_edges(rates: Sequence[tuple], best: tuple, low: tuple, high: tuple, names: Sequence[str]) -> str:
    """Which edges of the grid of `rates` the optimum `best` or its error bar [low, high] touches."""
    touched = []
    for j, name in enumerate(names):
        grid = sorted({lr[j] for lr in rates})
        label = "" if len(names) == 1 else f"{name.split('.')[-1]} "
        if best[j] == grid[0] or low[j] == grid[0]:
            touched.append(f"{label}low")
        if best[j] == grid[-1] or high[j] == grid[-1]:
            touched.append(f"{label}high")
    return "+".join(touched)
