"""The test metric during training (fig. 10(d)): which runs to draw, and their curves from metrics.jsonl.

Fig. 10(d) plots the test MSE of the autoencoder during training for all 7 seeds at two learning rates and the
epoch budget of 800 (appendix E): the larger rate overfits before the first learning-rate drop at half the budget,
which is why the rate that minimizes the test MSE falls as the budget grows while the one that minimizes the
training loss does not. The two rates, by default, are those fig. 10(c) contrasts at the LARGEST epoch budget of
the sweep: the optimal rate by the test metric and the optimal rate by the final training loss (one curve when
they coincide). `--curves-lr A,B` names the rates instead (eps_eff values of the grid). Without an epoch axis in
the sweep, every group (optimizer, B, ...) is a panel, at most MAX_PANELS of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from harness.analysis.checks import is_number
from harness.analysis.history import curve, read_history
from harness.analysis.select import Analysis, Cell, Row
from harness.core.errors import SweepError
from harness.core.status import COMPLETED

MAX_PANELS = 6
EPOCHS = "budget.epochs"


@dataclass
class Curves:
    """One learning rate's runs in one panel: every seed's (x, value) points, and their mean."""

    cell: Cell
    label: str
    seeds: list[list[tuple[float, float]]]
    mean: list[tuple[float, float]]
    x: str = "epoch"  # or "step", for runs whose metrics.jsonl has no training record with an epoch


def parse_rates(text: str) -> list[float]:
    """`--curves-lr 0.004,0.002` -> [0.004, 0.002]."""
    try:
        rates = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        rates = []
    if not rates or any(not math.isfinite(v) or v <= 0 for v in rates):
        raise SweepError(f"--curves-lr {text!r}: expected positive effective learning rates separated by commas, "
                         "e.g. --curves-lr 0.004,0.002")
    return rates


def panels(a: Analysis) -> list[Row]:
    """The groups to draw: those at the largest epoch budget (every group when the budget is not swept)."""
    rows = a.rows
    if EPOCHS in a.group_keys:
        i = a.group_keys.index(EPOCHS)
        budgets = [r.group[i] for r in rows if is_number(r.group[i])]
        if budgets:
            rows = [r for r in rows if r.group[i] == max(budgets)]
    return rows[:MAX_PANELS]


def chosen(a: Analysis, row: Row, rates: Optional[Sequence[float]] = None) -> list[tuple[Cell, str]]:
    """The cells of `row` to draw, each with why: the two optima, or the cells of `rates` (--curves-lr)."""
    metric = a.metric.replace("test_", "test ")
    if rates is None:
        picks = []
        if row.by_metric is not None:
            picks.append((row.by_metric.cell, f"optimal by {metric}"))
        if row.by_loss is not None:
            if picks and row.by_loss.cell is picks[0][0]:
                picks[0] = (picks[0][0], f"optimal by {metric} and by training loss")
            else:
                picks.append((row.by_loss.cell, "optimal by training loss"))
        return picks
    picks = []
    for rate in rates:
        matches = [c for c in row.cells if is_number(c.lr[0]) and math.isclose(c.lr[0], rate, rel_tol=1e-6)]
        if not matches:
            grid = ", ".join(f"{c.lr[0]:g}" for c in row.cells)
            raise SweepError(f"--curves-lr {rate:g}: no such effective learning rate in the grid of "
                             f"{', '.join(map(str, row.group))} (it has {grid})")
        # With the final rate swept too (sec. 7.1): the best cell by the test metric among this initial rate's.
        scored = [c for c in matches if c.by_metric is not None and math.isfinite(c.by_metric.mean)]
        best = (max if a.higher_is_better else min)(scored, key=lambda c: c.by_metric.mean) if scored else matches[0]
        picks.append((best, "--curves-lr"))
    return picks


def curves_of(a: Analysis, cell: Cell, label: str) -> Curves:
    """Every run's test-metric points (x: epoch, else step) and the mean over its completed runs at the points
    all of them share (diverged runs are drawn, not averaged: their metric runs off to the worst value)."""
    found = [(run, curve(read_history(run.history)[0], a.metric)) for run in sorted(cell.runs, key=lambda r: str(r.path))]
    found = [(run, points) for run, points in found if points]
    x = "epoch" if all(e is not None for _, points in found for _, e, _ in points) else "step"
    seeds, completed = [], []
    for run, points in found:
        seeds.append([(e if x == "epoch" else s, v) for s, e, v in points])
        if run.status == COMPLETED:
            completed.append(dict(seeds[-1]))
    shared = sorted(set.intersection(*(set(p) for p in completed))) if completed else []
    mean = [(t, sum(p[t] for p in completed) / len(completed)) for t in shared]
    return Curves(cell, label, seeds, mean, x)


def collect(a: Analysis, rates: Optional[Sequence[float]] = None) -> list[tuple[Row, list[Curves]]]:
    """Per panel, the curves to draw; [] when no run has two or more evaluations (nothing to show)."""
    drawn = [(row, [curves_of(a, cell, label) for cell, label in chosen(a, row, rates)]) for row in panels(a)]
    if not any(len(seed) >= 2 for _, cs in drawn for c in cs for seed in c.seeds):
        return []
    return drawn
