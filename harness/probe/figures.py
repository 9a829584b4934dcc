"""The probe's two figures (matplotlib, no display): the rate map of `harness probe` (every grid run, stable or
not, the optimal and largest stable rate against B, the linear-scaling line, the plateau, B_simple and the
boundary), and the steps-to-target curve of `harness probe --branch` (against perfect 1/k scaling)."""

from __future__ import annotations

import math
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _vline(ax, x, color, label) -> None:
    if x is not None and math.isfinite(x) and x > 0:
        ax.axvline(x, color=color, linestyle=":", linewidth=1.5, label=label)


def probe_figure(report: dict, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.4, 4.4))
    rows = report["rows"]
    for r in rows:
        for c in r["cells"]:
            ax.plot(r["batch_size"], c["effective_lr"], "o" if c["stable"] else "x", markersize=4,
                    color="0.65" if c["stable"] else "tab:red", markerfacecolor="none" if c["stable"] else None)
    opt = [(r["batch_size"], r["eps_opt"]) for r in rows if r["eps_opt"]]
    stable = [(r["batch_size"], r["eps_stable"]) for r in rows if r["eps_stable"]]
    if stable:
        ax.plot(*zip(*stable), "^-", color="tab:orange", label="largest stable eps_eff")
    if opt:
        ax.plot(*zip(*opt), "o-", color="tab:blue", label="optimal eps_eff (final train loss)")
    bs = [r["batch_size"] for r in rows]
    t = report.get("temperature")
    if t and bs:
        xs = [min(bs) / 2, max(bs) * 2]
        ax.plot(xs, [t * x for x in xs], "--", color="tab:blue", linewidth=1, label=f"linear scaling eps = T B, T = {t:.3g}")
    if report.get("eps_max"):
        ax.axhline(report["eps_max"], color="tab:blue", linestyle="-.", linewidth=1, label="plateau eps_max")
    _vline(ax, report.get("b_boundary"), "tab:purple", f"B_crit (boundary) = {report.get('b_boundary') or 0:.0f}")
    _vline(ax, report.get("b_simple"), "tab:green", f"B_simple = {report.get('b_simple') or 0:.0f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    lo, hi = report["lr_grid_log2"]
    ax.set_ylim(2.0 ** (lo - 0.5), 2.0 ** (hi + 0.5))
    ax.set_xlabel("batch size B")
    ax.set_ylabel("effective learning rate eps_eff")
    return _save(plt, fig, ax, path, f"probe: {Path(report['config']).stem}, {report['optimizer']}, "
                                     f"{report['steps']} steps (o stable, x not)")


def branch_figure(report: dict, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.4, 4.4))
    rows = report["rows"]
    base = next((r for r in rows if r["k"] == 1 and r["steps_to_target"]), None)
    reached = [(r["batch_size"], r["steps_to_target"]) for r in rows if r["steps_to_target"]]
    missed = [r["batch_size"] for r in rows if not r["steps_to_target"]]
    if reached:
        ax.plot(*zip(*reached), "o-", color="tab:blue", label="steps to target (branches)")
    if missed:
        ax.plot(missed, [report["cap"]] * len(missed), "x", color="tab:red", markersize=8,
                label="target not reached (diverged or capped)")
    if base:
        xs = [r["batch_size"] for r in rows]
        ax.plot(xs, [base["steps_to_target"] / r["k"] for r in rows], "--", color="0.4", linewidth=1,
                label="perfect scaling S(B) / k")
        tol = report["tolerance"]
        ax.plot(xs, [(1 + tol) * base["steps_to_target"] / r["k"] for r in rows], ":", color="0.4", linewidth=1,
                label=f"{100 * tol:.0f}% above perfect")
    _vline(ax, report.get("b_crit"), "tab:purple", f"B_crit = {report.get('b_crit') or 0:.0f}")
    _vline(ax, report.get("b_simple"), "tab:green", f"B_simple = {report.get('b_simple') or 0:.0f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("branch batch size B' = k B (eps_eff scaled by k, constant)")
    ax.set_ylabel(f"steps to {report['metric']} <= {report['target']:.4g}")
    return _save(plt, fig, ax, path, f"branches from {Path(report['run_dir']).name} at step {report['step']} "
                                     f"(mean over {report['seeds']} data orders)")


def _save(plt, fig, ax, path: Path, title: str) -> Path:
    """Title, grid, the legend beside the axes, a small PNG (dpi 90)."""
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
