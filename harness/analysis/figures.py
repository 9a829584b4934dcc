"""The paper's figures from an analysis, as PNG and SVG (matplotlib, no display needed).

- batch_size: optimal test metric, final training loss and optimal eps_eff against B on log2 axes, SGD and
  Momentum overlaid, with a linear-scaling reference line (figs. 1, 6, 7, 8);
- epochs: at fixed B against the epoch budget: the optimal test metric, the optimal training loss, and the
  optimal (initial, and final when swept) learning rates selected by test metric and by training loss
  (figs. 2, 3, 9, 10);
- lr_sweep: every learning rate's mean (+- std of the best k) at each batch size (fig. 5);
- curves: the test metric during training at two learning rates, every seed thin and their mean thick
  (fig. 10(d); which rates: curves.py), when the runs evaluated during training.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from harness.analysis import curves
from harness.analysis.select import Analysis
from harness.analysis.tables import column_name, fmt_lr

COLORS = {"sgd": "tab:blue", "momentum": "tab:red"}
STYLES = ["-", "--", ":", "-."]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(a: Analysis, group: tuple, skip: tuple) -> str:
    parts = []
    for key, value in zip(a.group_keys, group):
        if key in skip:
            continue
        parts.append(str(value) if key == "optim.name" else panel_title(key, value))
    return ", ".join(parts)


def _series(a: Analysis, x_key: str) -> dict[tuple, list]:
    """Rows grouped by every group key but `x_key` (one line per optimizer / norm / ...)."""
    xi = a.group_keys.index(x_key)
    out: dict[tuple, list] = {}
    for row in a.rows:
        key = tuple(v for i, v in enumerate(row.group) if i != xi)
        out.setdefault(key, []).append(row)
    for rows in out.values():
        rows.sort(key=lambda r: r.group[xi])
    return out


def _style(a: Analysis, key: tuple, index: int) -> dict:
    name = key[0] if a.group_keys[0] == "optim.name" and key else None
    return {"color": COLORS.get(name, f"C{index}"), "linestyle": STYLES[(index // 2) % len(STYLES)]}


def metric_label(metric: str) -> str:
    """test_accuracy -> "test accuracy (%)" (the harness records accuracy in percent), test_loss -> "test loss"."""
    text = metric.replace("test_", "test ").replace("_", " ")
    return f"{text} (%)" if "accuracy" in metric else text


def panel_title(key: str, value) -> str:
    """batch.global_batch_size=16 -> "B = 16"; other keys by their short column name."""
    return f"B = {value}" if key == "batch.global_batch_size" else f"{column_name(key)} = {value}"


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _save(fig, out: Path, stem: str, title: str = "") -> list[Path]:
    """Title, lay out, write STEM.png and STEM.svg (each written then renamed), close the figure."""
    if title:  # a spec's description can be long: wrapped to the figure's width (about 11 characters an inch)
        fig.suptitle("\n".join(textwrap.wrap(title, max(40, int(fig.get_figwidth() * 11)))))
    fig.tight_layout()
    paths = []
    for ext in ("png", "svg"):
        path = out / f"{stem}.{ext}"
        tmp = out / f".{stem}.tmp.{ext}"
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        tmp.replace(path)
        paths.append(path)
    _plt().close(fig)
    return paths


def batch_size_figure(a: Analysis, out: Path, title: str = "") -> list[Path]:
    return _save(draw_batch_size(a), out, "batch_size", title)


def draw_batch_size(a: Analysis):
    plt = _plt()
    key_b = "batch.global_batch_size"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    optima: dict[int, list[float]] = {}
    for i, (key, rows) in enumerate(sorted(_series(a, key_b).items(), key=lambda kv: str(kv[0]))):
        label = _label(a, rows[0].group, (key_b,))
        st = _style(a, key, i)
        pts = [(r.group[1], r.by_metric) for r in rows if r.by_metric is not None]
        if not pts:
            continue
        bs = [b for b, _ in pts]
        axes[0].errorbar(bs, [o.stats.mean for _, o in pts], yerr=[_nan0(o.stats.std) for _, o in pts],
                         marker="o", capsize=3, label=label, **st)
        tl = [(b, o.stats.other_mean, o.stats.other_std) for b, o in pts if _finite(o.stats.other_mean)]
        if tl:
            axes[1].errorbar([t[0] for t in tl], [t[1] for t in tl], yerr=[_nan0(t[2]) for t in tl], marker="o",
                             capsize=3, label=label, **st)
        lr = [o.cell.lr[0] for _, o in pts]
        yerr = [[l - o.low[0] for l, (_, o) in zip(lr, pts)], [o.high[0] - l for l, (_, o) in zip(lr, pts)]]
        axes[2].errorbar(bs, lr, yerr=yerr, marker="o", capsize=3, label=label, **st)
        for b, (_, o) in zip(bs, pts):
            if o.edge:  # an optimum at the grid's edge: hollow marker
                axes[2].plot([b], [o.cell.lr[0]], marker="o", markersize=11, markerfacecolor="none", color="k")
        for b, l in zip(bs, lr):
            optima.setdefault(b, []).append(l)
    if optima:  # anchored the same way whatever the series: the geometric mean of the optima at the smallest B
        b0, bmax = min(optima), max(optima)
        lr0 = math.exp(sum(map(math.log, optima[b0])) / len(optima[b0]))
        axes[2].plot([b0, bmax], [lr0, lr0 * bmax / b0], color="gray", linestyle=":",
                     label=f"linear scaling (eps ∝ B) from B = {b0}")
    axes[0].set_ylabel(f"optimal {metric_label(a.metric)}")
    axes[1].set_ylabel("final training loss at the optimum")
    axes[2].set_ylabel("optimal effective learning rate")
    axes[2].set_yscale("log", base=2)
    if not a.higher_is_better:
        _plain_log_axis(axes[0])
    _plain_log_axis(axes[1])
    for ax, letter in zip(axes, "abc"):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size B")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"({letter})", loc="left")
    axes[2].legend(fontsize=8)
    axes[0].legend(fontsize=8)
    return fig


def _plain_log_axis(ax) -> None:
    """A log y axis labelled with plain numbers (0.5, 1, 2) rather than 5 x 10^-1."""
    from matplotlib.ticker import LogLocator, ScalarFormatter

    ax.set_yscale("log")
    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)
    ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))


def _nan0(v: float) -> float:
    return v if _finite(v) else 0.0


def epochs_figure(a: Analysis, out: Path, title: str = "") -> list[Path]:
    plt = _plt()
    key_e = "budget.epochs"
    two_lrs = len(a.lr_keys) > 1
    fig, axes = plt.subplots(1, 4 if two_lrs else 3, figsize=(20 if two_lrs else 15, 4.2))
    for i, (key, rows) in enumerate(sorted(_series(a, key_e).items(), key=lambda kv: str(kv[0]))):
        label = _label(a, rows[0].group, (key_e,))
        st = _style(a, key, i)
        xi = a.group_keys.index(key_e)
        m = [(r.group[xi], r.by_metric) for r in rows if r.by_metric is not None]
        t = [(r.group[xi], r.by_loss) for r in rows if r.by_loss is not None]
        if m:
            axes[0].errorbar([e for e, _ in m], [o.stats.mean for _, o in m], yerr=[_nan0(o.stats.std) for _, o in m],
                             marker="o", capsize=3, label=label, **st)
            axes[2].plot([e for e, _ in m], [o.cell.lr[0] for _, o in m], marker="o", label=f"{label}: by test metric", **st)
        if t:
            axes[1].errorbar([e for e, _ in t], [o.stats.mean for _, o in t], yerr=[_nan0(o.stats.std) for _, o in t],
                             marker="o", capsize=3, label=label, **st)
            axes[2].plot([e for e, _ in t], [o.cell.lr[0] for _, o in t], marker="s", alpha=0.6,
                         label=f"{label}: by training loss", **{**st, "linestyle": "--"})
        if two_lrs:
            if m:
                axes[3].plot([e for e, _ in m], [o.cell.lr[1] for _, o in m], marker="o", label=f"{label}: by test metric", **st)
            if t:
                axes[3].plot([e for e, _ in t], [o.cell.lr[1] for _, o in t], marker="s", alpha=0.6,
                             label=f"{label}: by training loss", **{**st, "linestyle": "--"})
    axes[0].set_ylabel(f"optimal {metric_label(a.metric)}")
    axes[1].set_ylabel("optimal final training loss")
    axes[2].set_ylabel("optimal initial effective lr" if two_lrs else "optimal effective learning rate")
    if two_lrs:
        axes[3].set_ylabel("optimal final effective lr")
    for j, ax in enumerate(axes):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("epoch budget")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"({'abcd'[j]})", loc="left")
        if j >= 2:
            ax.set_yscale("log", base=2)
            ax.legend(fontsize=7)
    _plain_log_axis(axes[1])
    axes[0].legend(fontsize=8)
    return _save(fig, out, "epochs", title)


def lr_sweep_figure(a: Analysis, out: Path, title: str = "", max_cols: int = 8) -> list[Path]:
    return _save(draw_lr_sweep(a, max_cols), out, "lr_sweep", title)


def draw_lr_sweep(a: Analysis, max_cols: int = 8):
    """One column per (B, other keys): test metric (top) and training loss (bottom) against eps_eff. Up to
    `max_cols` columns in one band (so each band is one metric row over one loss row, labelled at its left);
    more panels wrap into bands of equal width. Cells whose best k include diverged runs (no finite mean) are drawn as x on the bottom
    edge of the metric panel (they have no value), and one legend below the panels names every mark."""
    from matplotlib.lines import Line2D

    plt = _plt()
    panels: dict[tuple, list] = {}
    for row in a.rows:
        panels.setdefault(tuple(row.group[1:]), []).append(row)
    keys = sorted(panels, key=str)
    keys.sort(key=lambda k: tuple(v if isinstance(v, (int, float)) else 0 for v in k))
    bands = math.ceil(len(keys) / max_cols)
    cols = math.ceil(len(keys) / bands)
    fig, axes = plt.subplots(2 * bands, cols, figsize=(3.2 * cols, 5.6 * bands + 0.6), squeeze=False)
    handles: dict[str, object] = {}
    for p, key in enumerate(keys):
        top, bottom = axes[2 * (p // cols)][p % cols], axes[2 * (p // cols) + 1][p % cols]
        for row in sorted(panels[key], key=lambda r: str(r.group[0])):
            st = _style(a, (row.group[0],), 0)
            cells = sorted(row.cells, key=lambda c: c.lr)
            pts = [(c.lr[0], c.by_metric) for c in cells if c.by_metric and _finite(c.by_metric.mean)]
            div = [c.lr[0] for c in cells if c.by_metric and not _finite(c.by_metric.mean)]
            if pts:
                line = top.errorbar([x for x, _ in pts], [s.mean for _, s in pts], yerr=[_nan0(s.std) for _, s in pts],
                                    marker="o", markersize=3, capsize=2, **st)
                handles.setdefault(str(row.group[0]), line)
            if div:  # x in data coordinates, y on the panel's bottom edge: no value to place them at
                top.plot(div, [0.03] * len(div), "x", color=st["color"], transform=top.get_xaxis_transform(),
                         clip_on=False)
                handles.setdefault("diverged", Line2D([], [], marker="x", color="k", linestyle="none"))
            tl = [(c.lr[0], c.by_loss) for c in cells if c.by_loss and _finite(c.by_loss.mean)]
            if tl:
                bottom.errorbar([x for x, _ in tl], [s.mean for _, s in tl], yerr=[_nan0(s.std) for _, s in tl],
                                marker="o", markersize=3, capsize=2, **st)
        top.set_title(", ".join(panel_title(k, v) for k, v in zip(a.group_keys[1:], key)), fontsize=9)
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.grid(True, which="both", alpha=0.3)
        _plain_log_axis(bottom)
        bottom.set_xlabel("effective learning rate")
        if p % cols == 0:
            top.set_ylabel(metric_label(a.metric))
            bottom.set_ylabel("final training loss")
    for p in range(len(keys), bands * cols):
        axes[2 * (p // cols)][p % cols].axis("off")
        axes[2 * (p // cols) + 1][p % cols].axis("off")
    labels = [k for k in handles if k != "diverged"] + (["diverged"] if "diverged" in handles else [])
    names = {"diverged": f"diverged (no finite mean of the best {a.k})"}
    # Below the panels (savefig's tight bounding box takes it in): the title keeps the top.
    fig.legend([handles[k] for k in labels], [names.get(k, k) for k in labels], loc="upper center", ncol=len(labels),
               bbox_to_anchor=(0.5, 0.0), frameon=False, fontsize=9)
    return fig


def curves_figure(a: Analysis, out: Path, title: str = "", rates=None) -> list[Path]:
    """Fig. 10(d): the test metric during training, one panel per group at the largest epoch budget."""
    drawn = curves.collect(a, rates)
    if not drawn:
        return []
    plt = _plt()
    fig, axes = plt.subplots(1, len(drawn), figsize=(6 * len(drawn), 4.4), squeeze=False)
    for ax, (row, lines) in zip(axes[0], drawn):
        for j, c in enumerate(lines):
            color = f"C{j}"
            for seed in c.seeds:  # every seed, thin
                ax.plot([x for x, _ in seed], [y for _, y in seed], color=color, linewidth=0.7, alpha=0.45)
            rate = "; final ".join(fmt_lr(v) for v in c.cell.lr)
            ax.plot([x for x, _ in c.mean], [y for _, y in c.mean], color=color, linewidth=2.4,
                    label=f"eps_eff {rate}: {c.label} ({len(c.seeds)} seeds, mean thick)")
        x = "epoch" if all(c.x == "epoch" for c in lines) else "step"
        epochs = row.group[a.group_keys.index(curves.EPOCHS)] if curves.EPOCHS in a.group_keys else None
        if x == "epoch" and _finite(epochs):  # sec. 4: the rate holds for half the budget, then decays
            ax.axvline(epochs / 2, color="gray", linestyle=":", label=f"first lr drop ({epochs / 2:g} epochs)")
        ax.set_title(_label(a, row.group, ()), fontsize=9)
        ax.set_xlabel(x)
        ax.set_ylabel(f"{metric_label(a.metric)} during training")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1)  # below the axes, off the data
    return _save(fig, out, "curves", title)


def write_figures(a: Analysis, out: Path, title: str = "", curves_lr=None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    batch_sizes = {row.group[1] for row in a.rows}
    if len(batch_sizes) > 1:
        paths += batch_size_figure(a, out, title)
    if "budget.epochs" in a.group_keys:
        paths += epochs_figure(a, out, title)
    paths += lr_sweep_figure(a, out, title)
    paths += curves_figure(a, out, title, curves_lr)
    return paths
