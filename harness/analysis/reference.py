"""The paper's own tables (shipped in harness/analysis/reference/) beside a sweep's: `--reference paper:tableN`."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional

from harness.analysis.select import Analysis
from harness.analysis.tables import fmt_lr, lr_text, metric_digits, pm
from harness.core.errors import SweepError

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"

def reference_table(name: str) -> tuple[Path, list[dict]]:
    """`paper:table1` -> the shipped copy of the paper's table (harness/analysis/reference/table1_*.csv)."""
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
            our_metric = pm(st.mean, st.std, digits)
            train = st.other_mean
            if "perplexity" in tname and math.isfinite(train):
                train = math.exp(train)  # the paper reports training perplexity = exp(mean cross-entropy)
            our_train = f"{train:.3f}" if math.isfinite(train) else "-"
            our_lr = lr_text(a, row.by_metric)
        lines.append(f"| {opt_name} | {b} | {our_metric} | {paper_metric} | {our_train} | "
                     f"{t if t is not None else '-'} | {our_lr} | {paper_lr} |")
    missing = [f"{g[0]} B={g[1]}" for g in ((row.group[0], row.group[1]) for row in a.rows)
               if not any(r.get("optimizer", "momentum") == g[0] and int(float(r["batch_size"])) == g[1] for r in ref)]
    if missing:
        lines.append(f"\n(not in the paper's table: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''})")
    return "\n".join(lines) + "\n"

