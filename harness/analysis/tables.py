"""The paper's tables from an analysis: Markdown, CSV and LaTeX, per selection (by test metric, and by final
training loss as in sec. 7), the per-cell table, and the one-paragraph report with its warnings."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Optional

from harness.analysis.select import TRAIN_LOSS_KEYS, TRAIN_LOSS_LABELS, Analysis, Optimum, Row
from harness.core.io import atomic_write_text


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


def pm(mean: float, std: float, digits: int, latex: bool = False) -> str:
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


def train_column(a: Analysis) -> str:
    """The CSV name of the final training loss: result.json's key (train_loss, the window; or train_set_loss)."""
    return TRAIN_LOSS_KEYS[a.train_loss_source]


def train_title(a: Analysis) -> str:
    """The Markdown/LaTeX name of the final training loss, saying which quantity it is."""
    return f"Final training loss ({TRAIN_LOSS_LABELS[a.train_loss_source]})"


def table_rows(a: Analysis, by: str) -> tuple[list[str], list[list]]:
    """CSV header and rows. by="metric": the paper's table; by="train_loss": sec. 7's selection."""
    extra = [column_name(k) for k in a.extra_keys]
    t = train_column(a)
    if by == "metric":
        header = ["optimizer", "batch_size", *extra, "n_runs", "k", "metric_mean", "metric_std", f"{t}_mean",
                  *_lr_cols(a), "edge_warning"]
    else:
        header = ["optimizer", "batch_size", *extra, "n_runs", "k", f"{t}_mean", f"{t}_std", "metric_mean",
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
            notes.append(f"edge: {opt.edge}, extend the grid")
        if c.n_missing_train:
            notes.append(f"{c.n_missing_train} without train_set_loss")
    else:
        notes.append("no optimum")
    # Seeds an adaptive search skipped are not missing: those rates cannot be optimal (harness/sweep/adaptive.py).
    others = sum(c.n_finished + c.n_skipped < n for c in row.cells if opt is None or c is not opt.cell)
    if others:
        notes.append(f"{others} other lrs incomplete")
    return "; ".join(notes)


def lr_text(a: Analysis, opt: Optional[Optimum], latex: bool = False) -> str:
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
    train = train_title(a)
    if by == "metric":
        head = ["Optimizer", "Batch size", *extra, "Runs", metric_title, train, "Optimal effective learning rate", "Notes"]
    else:
        head = ["Optimizer", "Batch size", *extra, "Runs", f"Optimal {train[0].lower()}{train[1:]}",
                metric_title.replace("Optimal ", ""), "Optimal effective learning rate (by training loss)", "Notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in a.rows:
        opt = row.by_metric if by == "metric" else row.by_loss
        runs = f"{opt.cell.n_finished}" if opt else f"{sum(c.n_finished for c in row.cells)}"
        if opt is None:
            vals = ["-", "-"]
        elif by == "metric":
            s = opt.stats
            vals = [pm(s.mean, s.std, digits), _train_text(opt, pm(s.other_mean, s.other_std, _loss_digits(s.other_mean)))]
        else:
            s = opt.stats
            vals = [pm(s.mean, s.std, _loss_digits(s.mean)), pm(s.other_mean, s.other_std, digits)]
        cells = [str(v) for v in row.group] + [runs, *vals, lr_text(a, opt), _notes(row, opt, a.n)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _train_text(opt: Optimum, text: str) -> str:
    """The training loss at the metric's optimum; n/a when a run among its best k lacks train_set_loss."""
    return "n/a" if opt.cell.n_missing_train and not math.isfinite(opt.stats.other_mean) else text


def to_latex(a: Analysis, by: str = "metric") -> str:
    metric_title, _ = _titles(a)
    digits = metric_digits(a.metric)
    extra = [column_name(k) for k in a.extra_keys]
    head = ["Optimizer", "Batch size", *extra, metric_title.replace("%", "\\%"), train_title(a),
            "Optimal effective learning rate"]
    lines = ["\\begin{tabular}{" + "l" * (2 + len(extra)) + "ccc}", "\\toprule", " & ".join(head) + " \\\\", "\\midrule"]
    for row in a.rows:
        opt = row.by_metric if by == "metric" else row.by_loss
        if opt is None:
            vals = ["--", "--"]
        elif by == "metric":
            vals = [pm(opt.stats.mean, opt.stats.std, digits, True),
                    pm(opt.stats.other_mean, opt.stats.other_std, _loss_digits(opt.stats.other_mean), True)]
        else:
            vals = [pm(opt.stats.other_mean, opt.stats.other_std, digits, True),
                    pm(opt.stats.mean, opt.stats.std, _loss_digits(opt.stats.mean), True)]
        group = [str(v).replace("_", "\\_") for v in row.group]
        lines.append(" & ".join([*group, *vals, lr_text(a, opt, latex=True)]) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def cells_csv(a: Analysis) -> str:
    extra = [column_name(k) for k in a.extra_keys]
    lr_names = ["effective_lr" if k == "optim.effective_lr" else k.rsplit(".", 1)[-1] for k in a.lr_keys]
    t = train_column(a)
    header = ["optimizer", "batch_size", *extra, *lr_names, "n_runs", "n_finished", "n_diverged", "k", "metric_mean",
              "metric_std", f"{t}_mean", f"{t}_std", "diverged_in_best_k"]
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


def report(a: Analysis) -> str:
    head = (f"{a.n_runs} runs ({a.n_runs - a.n_unfinished} finished"
            + (f", {a.n_unfinished} unfinished" if a.n_unfinished else "")
            + (f"; {a.expected} in the sweep's spec" if a.expected else "")
            + f"); metric {a.metric} ({'higher' if a.higher_is_better else 'lower'} is better); best {a.k} of {a.n} per cell")
    if a.layout != "run directories":
        head += f"; read from a {a.layout} layout"
    head += f"\nfinal training loss: {TRAIN_LOSS_TEXT[a.train_loss_source]}"
    if a.skipped:
        seeds = sum(x["why"].startswith("cannot be optimal") for x in a.skipped)
        head += (f"\nskipped by the adaptive search (not missing): {len(a.skipped)} grid points, {len(a.skipped) - seeds} "
                 f"outside the searched windows and {seeds} seeds of rates that cannot be optimal (why: .sweep/search.json)")
    skipped = sum(line.startswith("skipped ") for line in a.warnings)
    if skipped:
        head += f"\n{skipped} run directories skipped (one warning line each on stderr)"
    flags = [f"- {', '.join(map(str, row.group))}: {flag}" for row in a.rows for flag in row.flags]
    return head + ("\nwarnings:\n" + "\n".join(flags) if flags else "") + "\n"


TRAIN_LOSS_TEXT = {
    "window": "result.json train_loss, the mean train-mode minibatch loss over the final floor(S/20) steps "
              "(--train-loss window)",
    "train_set": "result.json train_set_loss, the loss over the full training set in eval mode at the end "
                 "(--train-loss train_set)",
}


def write_outputs(a: Analysis, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for by, stem in (("metric", "table"), ("train_loss", "table_by_train_loss")):
        for ext, text in (("md", to_markdown(a, by)), ("csv", to_csv(a, by)), ("tex", to_latex(a, by))):
            atomic_write_text(out / f"{stem}.{ext}", text)
            written.append(out / f"{stem}.{ext}")
    atomic_write_text(out / "cells.csv", cells_csv(a))
    written.append(out / "cells.csv")
    return written
