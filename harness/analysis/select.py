"""The paper's analysis protocol (sec. 4, sec. 7) over a sweep's runs: cells, groups, optima.

Runs are grouped into cells (optimizer, batch size, any other swept key, learning rate(s)); the seeds of a cell
are its n runs. Per cell, the best k of n by the test metric (`result.json: test_metric`, `higher_is_better`)
and, separately, by the final training loss (sec. 7: lower is better); per group (a cell without its learning
rate), the optimal rate, its error bar and the grid-edge check, for both selections. The statistics themselves
are the paper's rules in harness/recipe/selection.py.

"Final training loss" is one of two quantities (`--train-loss`): `window`, result.json's `train_loss`, the mean
train-mode minibatch loss over the final floor(S/20) steps (what every run records); or `train_set`,
`train_set_loss`, the loss over the full training set in eval mode at the end (runs with `eval.train_loss: true`;
no augmentation, batch-norm running statistics, dropout off), closer to what sec. 7 calls the training loss. A
completed run without `train_set_loss` counts as unfinished for the selection by training loss under `train_set`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from harness.analysis.runs import UNFINISHED, RunRecord, load_runs
from harness.core.errors import SweepError
from harness.core.status import DIVERGED
from harness.recipe import selection
from harness.recipe.selection import Stats

LR_KEYS = ("optim.effective_lr", "schedule.final_lr")
FIXED_GROUP_KEYS = ("optim.name", "batch.global_batch_size")
NOT_GROUP_KEYS = ("seed",)
# --train-loss: which result.json key the "final training loss" columns and the selection by training loss use.
TRAIN_LOSS_KEYS = {"window": "train_loss", "train_set": "train_set_loss"}
TRAIN_LOSS_LABELS = {"window": "last S/20 steps", "train_set": "train set, eval mode"}


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
    n_missing_train: int = 0  # completed runs without train_set_loss (--train-loss train_set)
    n_skipped: int = 0  # seeds an adaptive search left out: this rate cannot be optimal (harness/sweep/adaptive.py)


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
    train_loss_source: str = "window"  # a key of TRAIN_LOSS_KEYS
    warnings: list[str] = field(default_factory=list)  # one line per skipped run directory or missing value
    layout: str = "run directories"
    records: list[RunRecord] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # grid points an adaptive search left out, with why

    @property
    def extra_keys(self) -> list[str]:
        return self.group_keys[len(FIXED_GROUP_KEYS):]


def train_value(r: RunRecord, source: str) -> Optional[float]:
    return r.train_loss if source == "window" else r.train_set_loss


def cell_stats(cell: Cell, k: int, higher: bool, source: str = "window") -> None:
    """The cell's counts and its best-k statistics by test metric and by training loss (`source`)."""
    finished = [r for r in cell.runs if r.status != UNFINISHED]
    cell.n_finished = len(finished)
    cell.n_diverged = sum(r.status == DIVERGED for r in cell.runs)
    cell.n_unfinished = len(cell.runs) - cell.n_finished
    metrics, losses = [r.metric for r in finished], [train_value(r, source) for r in finished]
    cell.by_metric = selection.best_k(metrics, losses, k, higher)
    # A diverged run is a result (the worst value); a completed one without the chosen loss is not yet one.
    usable = [r for r in finished if r.status == DIVERGED or train_value(r, source) is not None or source == "window"]
    cell.n_missing_train = len(finished) - len(usable)
    cell.by_loss = selection.best_k([train_value(r, source) for r in usable], [r.metric for r in usable], k, False)


def optimum(cells: list[Cell], attr: str, higher: bool, lr_names: list[str]) -> Optional[Optimum]:
    """The optimal cell by `attr` stats' mean, its one-std error bar and the grid-edge check (sec. 4)."""
    best = selection.optimum([c.lr for c in cells], [getattr(c, attr) for c in cells], higher, lr_names)
    if best is None:
        return None
    cell = cells[best.index]
    return Optimum(cell, getattr(cell, attr), best.low, best.high, best.bar, best.edge)


def analyze(sweep_dir: Path, k: Optional[int] = None, n: Optional[int] = None, train_loss: str = "window",
            echo: Optional[Callable[[str], None]] = None) -> Analysis:
    """The analysis of every usable run below `sweep_dir`; `echo` gets each warning line as it arises."""
    if train_loss not in TRAIN_LOSS_KEYS:
        raise SweepError(f"--train-loss {train_loss!r}: expected one of {', '.join(TRAIN_LOSS_KEYS)}")
    loaded = load_runs(sweep_dir, echo)
    records, metric, higher = loaded.records, loaded.metric, loaded.higher
    spec_k, spec_n = loaded.select or (None, None)
    k, n = k or spec_k or selection.Selection().k, n or spec_n or selection.Selection().n
    if k > n:
        raise SweepError(f"best k of n needs k <= n; got k={k}, n={n}")
    warnings = list(loaded.warnings)
    if train_loss == "train_set":
        for r in records:
            if r.status != UNFINISHED and r.status != DIVERGED and r.train_set_loss is None:
                line = (f"{r.path}: no train_set_loss in result.json (its config had no eval.train_loss: true): it counts "
                        "as unfinished for the selection by training loss; train it with eval.train_loss: true, or "
                        "use --train-loss window")
                warnings.append(line)
                if echo is not None:
                    echo(line)
    keys = sorted({key for r in records for key in r.config})
    varying = [key for key in keys if len({r.config.get(key) for r in records}) > 1]
    lr_keys = [LR_KEYS[0]] + [key for key in LR_KEYS[1:] if key in varying]
    group_keys = list(FIXED_GROUP_KEYS) + [key for key in varying if key not in FIXED_GROUP_KEYS
                                           and key not in LR_KEYS and key not in NOT_GROUP_KEYS]
    cells: dict[tuple, Cell] = {}
    for r in records:
        g = tuple(r.config.get(key) for key in group_keys)
        lr = tuple(r.config.get(key) for key in lr_keys)
        cells.setdefault((g, lr), Cell(g, lr, [])).runs.append(r)
    for point in loaded.skipped:  # seeds left out at rates that were run: not missing runs
        key = (tuple(point["point"].get(k) for k in group_keys), tuple(point["point"].get(k) for k in lr_keys))
        if key in cells:
            cells[key].n_skipped += 1
    groups: dict[tuple, list[Cell]] = {}
    for (g, _), cell in sorted(cells.items(), key=lambda kv: (_sort_key(kv[0][0]), _sort_key(kv[0][1]))):
        cell_stats(cell, k, higher, train_loss)
        groups.setdefault(g, []).append(cell)
    rows = [_row(g, group_cells, higher, lr_keys, n) for g, group_cells in groups.items()]
    return Analysis(metric, higher, k, n, group_keys, lr_keys, rows, len(records),
                    sum(r.status == UNFINISHED for r in records), loaded.expected, train_loss, warnings,
                    loaded.layout, records, loaded.skipped)


def _row(group: tuple, cells: list[Cell], higher: bool, lr_keys: list[str], n: int) -> Row:
    row = Row(group, cells, optimum(cells, "by_metric", higher, lr_keys), optimum(cells, "by_loss", False, lr_keys))
    few = [c for c in cells if c.n_finished + c.n_skipped < n]
    if few:
        row.flags.append(f"{len(few)} of {len(cells)} lrs have fewer than n={n} finished runs")
    # Sec. 4: neither optimum nor its error bar may touch the grid's edge, whichever quantity selects it.
    for opt, what in ((row.by_metric, "test-metric"), (row.by_loss, "training-loss")):
        if opt is None:
            row.flags.append(f"no {what} optimum: no learning rate without a diverged run among the best k")
        elif opt.edge:
            row.flags.append(f"{what} optimum or error bar at the grid edge ({opt.edge}): extend the grid")
    return row


def _sort_key(values: tuple) -> tuple:
    return tuple((0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v)) for v in values)
