"""The paper's analysis protocol (sec. 4, sec. 7), from run directories alone.

Every run below a directory contributes its config.yaml and result.json. Runs are grouped into cells
(optimizer, batch size, any other swept key, learning rate(s)); the seeds of a cell are its n runs.
- Per cell: the best k runs by the test metric (`result.json: test_metric`, `higher_is_better`); their
  mean and standard deviation, and the mean final training loss of the same k runs. A diverged run (status
  diverged, metric null) counts as the worst value: if it falls among the best k, the cell's mean is the
  worst possible and the cell cannot be optimal; it is counted and shown either way.
- Per group (a cell without its learning rate): the optimal learning rate is the cell with the best mean
  (ties: the smaller rate); its error bar is every rate whose mean is within one standard deviation (of the
  optimal cell) of the optimal mean; a warning when the optimum or its error bar touches the edge of the
  group's grid (the grid must then be extended).
- The same, separately, selecting by the final training loss (sec. 7: lower is better).
Standard deviations are sample standard deviations (ddof 1) of the k values (0 for a single run).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from harness.errors import SweepError
from harness.config import flatten, is_layout_key

LR_KEYS = ("optim.effective_lr", "schedule.final_lr")
FIXED_GROUP_KEYS = ("optim.name", "batch.global_batch_size")
NOT_GROUP_KEYS = ("seed",)
DEFAULT_K, DEFAULT_N = 12, 15
SKIP_DIRS = (".sweep", "analysis")
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


@dataclass
class RunRecord:
    path: Path
    config: dict  # flattened science keys
    status: str  # completed | diverged | unfinished
    metric: Optional[float]
    train_loss: Optional[float]


@dataclass
class Stats:
    """Best k of a cell's runs by one criterion."""

    k: int
    mean: float
    std: float
    other_mean: float  # the other quantity (train loss / metric) over the same k runs
    other_std: float
    diverged_in_best: bool


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


# ---------------------------------------------------------------------------------------------- loading


def load_runs(sweep_dir: Path) -> tuple[list[RunRecord], str, bool]:
    """Every run directory below `sweep_dir` (a config.yaml; result.json if it finished)."""
    import json

    sweep_dir = Path(sweep_dir)
    records, metrics = [], set()
    for cfg_path in sorted(sweep_dir.rglob("config.yaml")):
        rel = cfg_path.relative_to(sweep_dir).parts
        if any(part in SKIP_DIRS for part in rel[:-1]):
            continue
        config = {k: v for k, v in flatten(yaml.safe_load(cfg_path.read_text()) or {}).items() if not is_layout_key(k)}
        result = None
        res_path = cfg_path.with_name("result.json")
        if res_path.is_file():
            try:
                result = json.loads(res_path.read_text())
            except json.JSONDecodeError:
                result = None
        if result is None or result.get("status") not in ("completed", "diverged"):
            records.append(RunRecord(cfg_path.parent, config, "unfinished", None, None))
            continue
        name = result.get("test_metric")
        metrics.add((name, bool(result.get("higher_is_better", True))))
        value = result.get(name) if name else None
        records.append(RunRecord(cfg_path.parent, config, result["status"], _num(value), _num(result.get("train_loss"))))
    if not records:
        raise SweepError(f"no run directories (config.yaml) below {sweep_dir}; run `harness sweep SPEC` first")
    if len(metrics) > 1:
        shown = ", ".join(sorted(m for m, _ in metrics))
        raise SweepError(f"runs below {sweep_dir} report different test metrics ({shown}); analyze one experiment per directory")
    metric, higher = next(iter(metrics)) if metrics else ("test_metric", True)
    return records, metric, higher


def _num(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def selection_of(sweep_dir: Path) -> tuple[int, int]:
    """k and n from the sweep.yaml `harness sweep` wrote, else the paper's WRN default (12 of 15)."""
    path = Path(sweep_dir) / "sweep.yaml"
    if path.is_file():
        select = (yaml.safe_load(path.read_text()) or {}).get("select") or {}
        return int(select.get("k", DEFAULT_K)), int(select.get("n", DEFAULT_N))
    return DEFAULT_K, DEFAULT_N


def expected_runs(sweep_dir: Path) -> int:
    import json

    path = Path(sweep_dir) / ".sweep" / "runs.json"
    try:
        return len(json.loads(path.read_text())["runs"])
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return 0


# ---------------------------------------------------------------------------------------------- statistics


def _std(values: list[float]) -> float:
    if any(not math.isfinite(v) for v in values):
        return math.nan
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def best_k(runs: list[RunRecord], k: int, value, higher: bool, other) -> Optional[Stats]:
    """Mean and std of the best k runs by `value(run)`; a run without a finite value is the worst."""
    finished = [r for r in runs if r.status != "unfinished"]
    if not finished:
        return None
    worst = -math.inf if higher else math.inf
    scored = []
    for i, r in enumerate(finished):
        v = value(r)
        scored.append((v if v is not None and math.isfinite(v) else worst, i, r))
    # Best first; equal values keep the runs' order (sorted by directory name: deterministic).
    scored.sort(key=lambda t: (-t[0] if higher else t[0], t[1]))
    chosen = scored[:k]
    vals = [v for v, _, _ in chosen]
    others = [o if (o := other(r)) is not None else math.nan for _, _, r in chosen]
    diverged = any(math.isinf(v) for v in vals)
    mean = worst if diverged else sum(vals) / len(vals)
    other_mean = sum(others) / len(others)
    return Stats(len(chosen), mean, _std(vals), other_mean, _std(others), diverged)


def _grid_edges(cells: list[Cell], best: Cell, low: tuple, high: tuple, names: list[str]) -> str:
    touched = []
    for j, name in enumerate(names):
        grid = sorted({c.lr[j] for c in cells})
        label = "" if len(names) == 1 else f"{name.split('.')[-1]} "
        if best.lr[j] == grid[0] or low[j] == grid[0]:
            touched.append(f"{label}low")
        if best.lr[j] == grid[-1] or high[j] == grid[-1]:
            touched.append(f"{label}high")
    return "+".join(touched)


def optimum(cells: list[Cell], attr: str, higher: bool, lr_names: list[str]) -> Optional[Optimum]:
    """The optimal cell by `attr` stats' mean, its one-std error bar and the grid-edge check (sec. 4)."""
    scored = [c for c in cells if getattr(c, attr) is not None and math.isfinite(getattr(c, attr).mean)]
    if not scored:
        return None
    # Best mean first; on a tie the smaller learning rate(s).
    best = sorted(scored, key=lambda c: (-getattr(c, attr).mean if higher else getattr(c, attr).mean, c.lr))[0]
    stats = getattr(best, attr)
    spread = stats.std if math.isfinite(stats.std) else 0.0
    bar = sorted(c.lr for c in scored if abs(getattr(c, attr).mean - stats.mean) <= spread)
    low = tuple(min(lr[j] for lr in bar) for j in range(len(lr_names)))
    high = tuple(max(lr[j] for lr in bar) for j in range(len(lr_names)))
    return Optimum(best, stats, low, high, bar, _grid_edges(cells, best, low, high, lr_names))


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
        cell = cells.setdefault((g, lr), Cell(g, lr, []))
        cell.runs.append(r)
    groups: dict[tuple, list[Cell]] = {}
    for (g, _), cell in sorted(cells.items(), key=lambda kv: (_sort_key(kv[0][0]), _sort_key(kv[0][1]))):
        cell.n_finished = sum(r.status != "unfinished" for r in cell.runs)
        cell.n_diverged = sum(r.status == "diverged" for r in cell.runs)
        cell.n_unfinished = len(cell.runs) - cell.n_finished
        cell.by_metric = best_k(cell.runs, k, lambda r: r.metric, higher, lambda r: r.train_loss)
        cell.by_loss = best_k(cell.runs, k, lambda r: r.train_loss, False, lambda r: r.metric)
        groups.setdefault(g, []).append(cell)
    rows = []
    for g, group_cells in groups.items():
        row = Row(g, group_cells, optimum(group_cells, "by_metric", higher, lr_keys),
                  optimum(group_cells, "by_loss", False, lr_keys))
        few = [c for c in group_cells if c.n_finished < n]
        if few:
            row.flags.append(f"{len(few)} of {len(group_cells)} lrs have fewer than n={n} finished runs")
        if row.by_metric is None:
            row.flags.append("no learning rate without a diverged run among the best k")
        elif row.by_metric.edge:
            row.flags.append(f"optimum or error bar at the grid edge ({row.by_metric.edge}): extend the grid")
        rows.append(row)
    return Analysis(metric, higher, k, n, group_keys, lr_keys, rows, len(records),
                    sum(r.status == "unfinished" for r in records), expected_runs(sweep_dir))


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def _sort_key(values: tuple) -> tuple:
    return tuple((0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v)) for v in values)


# ---------------------------------------------------------------------------------------------- formatting


def fmt_lr(v: Optional[float], latex: bool = False) -> str:
    """Powers of two as the paper prints them (2^3, 2^-1.5); anything else as a decimal."""
    if v is None or not math.isfinite(v) or v <= 0:
        return "-"
    e = math.log2(v)
    for denom in (1, 2):
        if abs(e * denom - round(e * denom)) < 1e-9:
            text = f"{round(e * denom) / denom:g}"
            return f"$2^{{{text}}}$" if latex else f"2^{text}"
    return f"{v:g}"


def metric_digits(metric: str) -> int:
    return {"test_accuracy": 1, "test_perplexity": 2, "test_mse": 2}.get(metric, 3)


def _pm(mean: float, std: float, digits: int, latex: bool = False) -> str:
    if mean is None or not math.isfinite(mean):
        return "diverged"
    sep = " $\\pm$ " if latex else " ± "
    std_text = "nan" if not math.isfinite(std) else f"{std:.{digits}f}"
    return f"{mean:.{digits}f}{sep}{std_text}"


def _loss_digits(v: float) -> int:
    return 3 if v is None or not math.isfinite(v) or abs(v) >= 0.01 else 4


def column_name(key: str) -> str:
    return key.rsplit(".", 1)[-1] if key not in ("optim.name", "batch.global_batch_size") else \
        {"optim.name": "optimizer", "batch.global_batch_size": "batch_size"}[key]


def _lr_cols(a: Analysis) -> list[str]:
    cols = []
    for key in a.lr_keys:
        base = "opt_effective_lr" if key == "optim.effective_lr" else f"opt_{key.rsplit('.', 1)[-1]}"
        cols += [base, f"{base}_low", f"{base}_high"]
    return cols


def table_rows(a: Analysis, by: str) -> tuple[list[str], list[list]]:
    """CSV header and rows. by="metric": the paper's table; by="train_loss": sec. 7's selection."""
    extra = [column_name(k) for k in a.extra_keys]
    if by == "metric":
        header = ["optimizer", "batch_size", *extra, "n_runs", "k", "metric_mean", "metric_std", "train_loss_mean",
                  *_lr_cols(a), "edge_warning"]
    else:
        header = ["optimizer", "batch_size", *extra, "n_runs", "k", "train_loss_mean", "train_loss_std", "metric_mean",
                  *_lr_cols(a), "edge_warning"]
    out = []
    for row in a.rows:
        opt = row.by_metric if by == "metric" else row.by_loss
        lead = list(row.group)
        if opt is None:
            out.append([*lead, sum(c.n_finished for c in row.cells), 0, None, None, None,
                        *([None] * 3 * len(a.lr_keys)), "no optimum"])
            continue
        lrs = []
        for j in range(len(a.lr_keys)):
            lrs += [opt.cell.lr[j], opt.low[j], opt.high[j]]
        s = opt.stats
        out.append([*lead, opt.cell.n_finished, s.k, s.mean, s.std, s.other_mean, *lrs, opt.edge])
    return header, out


def to_csv(a: Analysis, by: str = "metric") -> str:
    header, rows = table_rows(a, by)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if v is None else (repr(v) if isinstance(v, float) else v) for v in r])
    return buf.getvalue()


def _titles(a: Analysis) -> tuple[str, str]:
    name = a.metric.replace("test_", "")
    unit = " (%)" if a.metric == "test_accuracy" else ""
    return f"Optimal test {name}{unit}", f"test {name}"


def _notes(row: Row, opt: Optional[Optimum], n: int) -> str:
    notes = []
    if opt is not None:
        c = opt.cell
        if c.n_diverged:
            notes.append(f"{c.n_diverged} diverged")
        if c.n_finished < n:
            notes.append(f"{c.n_finished}/{n} finished")
        if opt.stats.diverged_in_best:
            notes.append("diverged run in best k")
        if opt.edge:
            notes.append(f"edge: {opt.edge}")
    else:
        notes.append("no optimum")
    others = sum(c.n_finished < n for c in row.cells if opt is None or c is not opt.cell)
    if others:
        notes.append(f"{others} other lrs incomplete")
    return "; ".join(notes)


def _lr_text(a: Analysis, opt: Optional[Optimum], latex: bool = False) -> str:
    if opt is None:
        return "-"
    parts = []
    for j, key in enumerate(a.lr_keys):
        label = "" if j == 0 else "final "
        parts.append(f"{label}{fmt_lr(opt.cell.lr[j], latex)} ({fmt_lr(opt.low[j], latex)} to {fmt_lr(opt.high[j], latex)})")
    return "; ".join(parts)


def to_markdown(a: Analysis, by: str = "metric") -> str:
    metric_title, metric_short = _titles(a)
    digits = metric_digits(a.metric)
    extra = [column_name(k) for k in a.extra_keys]
    if by == "metric":
        head = ["Optimizer", "Batch size", *extra, "Runs", metric_title, "Final training loss", "Optimal effective learning rate", "Notes"]
    else:
        head = ["Optimizer", "Batch size", *extra, "Runs", "Optimal final training loss", metric_title.replace("Optimal ", ""),
                "Optimal effective learning rate (by training loss)", "Notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in a.rows:
        opt = row.by_metric if by == "metric" else row.by_loss
        runs = f"{opt.cell.n_finished}" if opt else f"{sum(c.n_finished for c in row.cells)}"
        if opt is None:
            vals = ["-", "-"]
        elif by == "metric":
            s = opt.stats
            vals = [_pm(s.mean, s.std, digits), _pm(s.other_mean, s.other_std, _loss_digits(s.other_mean))]
        else:
            s = opt.stats
            vals = [_pm(s.mean, s.std, _loss_digits(s.mean)), _pm(s.other_mean, s.other_std, digits)]
        cells = [str(v) for v in row.group] + [runs, *vals, _lr_text(a, opt), _notes(row, opt, a.n)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_latex(a: Analysis, by: str = "metric") -> str:
    metric_title, _ = _titles(a)
    digits = metric_digits(a.metric)
    extra = [column_name(k) for k in a.extra_keys]
    head = ["Optimizer", "Batch size", *extra, metric_title.replace("%", "\\%"), "Final training loss",
            "Optimal effective learning rate"]
    lines = ["\\begin{tabular}{" + "l" * (2 + len(extra)) + "ccc}", "\\toprule", " & ".join(head) + " \\\\", "\\midrule"]
    for row in a.rows:
        opt = row.by_metric if by == "metric" else row.by_loss
        if opt is None:
            vals = ["--", "--"]
        elif by == "metric":
            vals = [_pm(opt.stats.mean, opt.stats.std, digits, True),
                    _pm(opt.stats.other_mean, opt.stats.other_std, _loss_digits(opt.stats.other_mean), True)]
        else:
            vals = [_pm(opt.stats.other_mean, opt.stats.other_std, digits, True),
                    _pm(opt.stats.mean, opt.stats.std, _loss_digits(opt.stats.mean), True)]
        group = [str(v).replace("_", "\\_") for v in row.group]
        lines.append(" & ".join([*group, *vals, _lr_text(a, opt, latex=True)]) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def cells_csv(a: Analysis) -> str:
    extra = [column_name(k) for k in a.extra_keys]
    lr_names = ["effective_lr" if k == "optim.effective_lr" else k.rsplit(".", 1)[-1] for k in a.lr_keys]
    header = ["optimizer", "batch_size", *extra, *lr_names, "n_runs", "n_finished", "n_diverged", "k", "metric_mean",
              "metric_std", "train_loss_mean", "train_loss_std", "diverged_in_best_k"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in a.rows:
        for c in row.cells:
            s, t = c.by_metric, c.by_loss
            w.writerow([*row.group, *c.lr, len(c.runs), c.n_finished, c.n_diverged, s.k if s else 0,
                        *(repr(v) for v in ((s.mean, s.std) if s else (None, None))),
                        *(repr(v) for v in ((t.mean, t.std) if t else (None, None))),
                        bool(s and s.diverged_in_best)])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- the paper's numbers


def reference_table(name: str) -> tuple[Path, list[dict]]:
    """`paper:table1` -> the shipped copy of the paper's table (harness/reference/table1_*.csv)."""
    if not name.startswith("paper:"):
        raise SweepError(f"--reference {name!r}: expected paper:tableN (N = 1..7)")
    table = name.split(":", 1)[1]
    found = sorted(REFERENCE_DIR.glob(f"{table}_*.csv"))
    if not found:
        have = ", ".join(sorted(p.name.split("_")[0] for p in REFERENCE_DIR.glob("table*_*.csv")))
        raise SweepError(f"--reference {name!r}: the paper has no {table} here; available: paper:" + ", paper:".join(have.split(", ")))
    with open(found[0]) as f:
        return found[0], list(csv.DictReader(f))


def _ref_fields(row: dict) -> tuple:
    """(metric mean, std, train mean, train name, lr, low, high) from any of the paper tables' layouts."""
    def pick(prefix, suffix=""):
        for key in row:
            if key.startswith(prefix) and key.endswith(suffix):
                return key
        return None

    m = pick("test_", "_mean") or pick("test_")
    s = pick("test_", "_std")
    t = pick("train_", "_mean") or pick("train_")
    return (_float(row.get(m)), _float(row.get(s)), _float(row.get(t)), t or "", _float(row.get("opt_eff_lr")),
            _float(row.get("opt_eff_lr_low")), _float(row.get("opt_eff_lr_high")))


def _float(v) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def compare(a: Analysis, name: str) -> str:
    """Our table beside the paper's, matched on (optimizer, batch size)."""
    path, ref = reference_table(name)
    digits = metric_digits(a.metric)
    ours = {}
    for row in a.rows:
        ours.setdefault((row.group[0], row.group[1]), row)
    lines = [f"Reference: {path.name} (Smith, Elsen & De 2020) beside this sweep ({a.metric}, best {a.k} of {a.n}):", "",
             "| Optimizer | Batch size | ours | paper | train (ours) | train (paper) | eps_eff (ours) | eps_eff (paper) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in ref:
        opt_name = r.get("optimizer", "momentum")
        b = int(float(r["batch_size"]))
        m, s, t, tname, lr, lo, hi = _ref_fields(r)
        paper_metric = f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "") if m is not None else "-"
        paper_lr = fmt_lr(lr) + (f" ({fmt_lr(lo)} to {fmt_lr(hi)})" if lo is not None else "")
        row = ours.get((opt_name, b))
        if row is None or row.by_metric is None:
            our_metric = our_train = our_lr = "-"
        else:
            st = row.by_metric.stats
            our_metric = _pm(st.mean, st.std, digits)
            train = st.other_mean
            if "perplexity" in tname and math.isfinite(train):
                train = math.exp(train)  # the paper reports training perplexity = exp(mean cross-entropy)
            our_train = f"{train:.3f}" if math.isfinite(train) else "-"
            our_lr = _lr_text(a, row.by_metric)
        lines.append(f"| {opt_name} | {b} | {our_metric} | {paper_metric} | {our_train} | "
                     f"{t if t is not None else '-'} | {our_lr} | {paper_lr} |")
    missing = [f"{g[0]} B={g[1]}" for g in ((row.group[0], row.group[1]) for row in a.rows)
               if not any(r.get("optimizer", "momentum") == g[0] and int(float(r["batch_size"])) == g[1] for r in ref)]
    if missing:
        lines.append(f"\n(not in the paper's table: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''})")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- report


def report(a: Analysis) -> str:
    head = (f"{a.n_runs} runs ({a.n_runs - a.n_unfinished} finished"
            + (f", {a.n_unfinished} unfinished" if a.n_unfinished else "")
            + (f"; {a.expected} in the sweep's spec" if a.expected else "")
            + f"); metric {a.metric} ({'higher' if a.higher_is_better else 'lower'} is better); best {a.k} of {a.n} per cell")
    flags = [f"- {', '.join(map(str, row.group))}: {flag}" for row in a.rows for flag in row.flags]
    return head + ("\nwarnings:\n" + "\n".join(flags) if flags else "") + "\n"


def write_outputs(a: Analysis, out: Path) -> list[Path]:
    from harness.rundir import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for by, stem in (("metric", "table"), ("train_loss", "table_by_train_loss")):
        for ext, text in (("md", to_markdown(a, by)), ("csv", to_csv(a, by)), ("tex", to_latex(a, by))):
            atomic_write_text(out / f"{stem}.{ext}", text)
            written.append(out / f"{stem}.{ext}")
    atomic_write_text(out / "cells.csv", cells_csv(a))
    written.append(out / "cells.csv")
    return written
