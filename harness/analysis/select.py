"""The paper's analysis protocol (sec. 4, sec. 7) over a sweep's runs: cells, groups, optima.

Runs are grouped into cells (optimizer, batch size, any other swept key, learning rate(s)); the seeds of a cell
are its n runs. Per cell, the best k of n by the test metric (`result.json: test_metric`, `higher_is_better`)
and, separately, by the final training loss (sec. 7: lower is better); per group (a cell without its learning
rate), the optimal rate, its error bar and the grid-edge check. The statistics themselves are the paper's rules
in harness/recipe/selection.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from harness.analysis.runs import UNFINISHED, RunRecord, expected_runs, load_runs, selection_of
from harness.core.errors import SweepError
from harness.core.status import DIVERGED
from harness.recipe import selection
from harness.recipe.selection import Stats

LR_KEYS = ("optim.effective_lr", "schedule.final_lr")
FIXED_GROUP_KEYS = ("optim.name", "batch.global_batch_size")
NOT_GROUP_KEYS = ("seed",)


@dataclass
class Cell:
    group: tuple
    lr: tuple
    runs: list[RunRecord]
    n_finished: int = 0
    n_diverged: int = 0
    n_unfinished: int = 0
    by_metric: Optional[Stats] = None
    by_loss: Optional[Stats] = None


@dataclass
class Optimum:
    cell: Cell
    stats: Stats
    low: tuple  # per lr key: lowest rate in the error bar
    high: tuple
    bar: list[tuple]  # the rates inside the error bar
    edge: str  # "" or which grid edges the optimum / error bar touch


@dataclass
class Row:
    group: tuple
    cells: list[Cell]
    by_metric: Optional[Optimum]
    by_loss: Optional[Optimum]
    flags: list[str] = field(default_factory=list)


@dataclass
class Analysis:
    metric: str
    higher_is_better: bool
    k: int
    n: int
    group_keys: list[str]
    lr_keys: list[str]
    rows: list[Row]
    n_runs: int
    n_unfinished: int
    expected: int  # runs listed in .sweep/runs.json (0 if none)

    @property
    def extra_keys(self) -> list[str]:
        return self.group_keys[len(FIXED_GROUP_KEYS):]


def cell_stats(cell: Cell, k: int, higher: bool) -> None:
    """The cell's counts and its best-k statistics by test metric and by training loss."""
    finished = [r for r in cell.runs if r.status != UNFINISHED]
    cell.n_finished = len(finished)
    cell.n_diverged = sum(r.status == DIVERGED for r in cell.runs)
    cell.n_unfinished = len(cell.runs) - cell.n_finished
    metrics, losses = [r.metric for r in finished], [r.train_loss for r in finished]
    cell.by_metric = selection.best_k(metrics, losses, k, higher)
    cell.by_loss = selection.best_k(losses, metrics, k, False)


def optimum(cells: list[Cell], attr: str, higher: bool, lr_names: list[str]) -> Optional[Optimum]:
    """The optimal cell by `attr` stats' mean, its one-std error bar and the grid-edge check (sec. 4)."""
    best = selection.optimum([c.lr for c in cells], [getattr(c, attr) for c in cells], higher, lr_names)
    if best is None:
        return None
    cell = cells[best.index]
    return Optimum(cell, getattr(cell, attr), best.low, best.high, best.bar, best.edge)


def analyze(sweep_dir: Path, k: Optional[int] = None, n: Optional[int] = None) -> Analysis:
    records, metric, higher = load_runs(sweep_dir)
    spec_k, spec_n = selection_of(sweep_dir)
    k, n = k or spec_k, n or spec_n
    if k > n:
        raise SweepError(f"best k of n needs k <= n; got k={k}, n={n}")
    keys = sorted({key for r in records for key in r.config})
    varying = [key for key in keys if len({_hashable(r.config.get(key)) for r in records}) > 1]
    lr_keys = [LR_KEYS[0]] + [key for key in LR_KEYS[1:] if key in varying]
    group_keys = list(FIXED_GROUP_KEYS) + [key for key in varying if key not in FIXED_GROUP_KEYS
                                           and key not in LR_KEYS and key not in NOT_GROUP_KEYS]
    cells: dict[tuple, Cell] = {}
    for r in records:
        g = tuple(r.config.get(key) for key in group_keys)
        lr = tuple(r.config.get(key) for key in lr_keys)
        cells.setdefault((g, lr), Cell(g, lr, [])).runs.append(r)
    groups: dict[tuple, list[Cell]] = {}
    for (g, _), cell in sorted(cells.items(), key=lambda kv: (_sort_key(kv[0][0]), _sort_key(kv[0][1]))):
        cell_stats(cell, k, higher)
        groups.setdefault(g, []).append(cell)
    rows = [_row(g, group_cells, higher, lr_keys, n) for g, group_cells in groups.items()]
    return Analysis(metric, higher, k, n, group_keys, lr_keys, rows, len(records),
                    sum(r.status == UNFINISHED for r in records), expected_runs(sweep_dir))


def _row(group: tuple, cells: list[Cell], higher: bool, lr_keys: list[str], n: int) -> Row:
    row = Row(group, cells, optimum(cells, "by_metric", higher, lr_keys), optimum(cells, "by_loss", False, lr_keys))
    few = [c for c in cells if c.n_finished < n]
    if few:
        row.flags.append(f"{len(few)} of {len(cells)} lrs have fewer than n={n} finished runs")
    if row.by_metric is None:
        row.flags.append("no learning rate without a diverged run among the best k")
    elif row.by_metric.edge:
        row.flags.append(f"optimum or error bar at the grid edge ({row.by_metric.edge}): extend the grid")
    return row


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def _sort_key(values: tuple) -> tuple:
    return tuple((0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v)) for v in values)
