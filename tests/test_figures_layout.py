"""The figures as a reader sees them, asserted on the matplotlib Figure objects (labels, legend entries, grid
shape), not on pixels: accuracy in %, the lr sweep one metric row over one loss row, diverged cells named in
the legend, panel titles as B = 16, one linear-scaling anchor."""

from __future__ import annotations

import math

from harness import analysis
from harness.analysis.figures import draw_batch_size, draw_lr_sweep, panel_title
from harness.analysis.runs import title_of
from tests.test_analysis import cell

BATCHES = (16, 32, 64, 128, 256, 512, 1024, 1347)


def sweep(root):
    """Two optimizers, 8 batch sizes, 3 rates, 2 seeds; the largest rate diverges at every B for SGD."""
    for opt in ("sgd", "momentum"):
        for b in BATCHES:
            for i, lr in enumerate((0.5 * b / 16, b / 16, 2 * b / 16)):
                diverged = opt == "sgd" and i == 2
                cell(root, opt, b, lr, [90.0 - abs(i - 1), 89.0 - abs(i - 1)], losses=[0.1 * (1 + i), 0.12 * (1 + i)],
                     statuses=["diverged"] * 2 if diverged else None)
    return analysis.analyze(root, k=2, n=2)


def test_lr_sweep_is_one_metric_row_over_one_loss_row_with_a_legend_for_every_mark(tmp_path):
    fig = draw_lr_sweep(sweep(tmp_path))
    axes = fig.axes
    assert len(axes) == 2 * len(BATCHES)  # 2 rows x 8 columns: no wrapped band interleaving the rows
    grid = axes[0].get_subplotspec().get_gridspec()
    assert (grid.nrows, grid.ncols) == (2, 8)
    top = [ax for ax in axes if ax.get_subplotspec().rowspan.start == 0]
    assert [ax.get_title() for ax in top] == [f"B = {b}" for b in BATCHES]
    assert top[0].get_ylabel() == "test accuracy (%)"
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["momentum", "sgd", "diverged (no finite mean of the best 2)"]
    assert not any(ax.get_legend() for ax in axes)  # one legend, for every panel
    marks = [line for line in top[0].get_lines() if line.get_marker() == "x"]
    assert marks and all(y == 0.03 for line in marks for y in line.get_ydata())  # on the bottom edge, named


def test_lr_sweep_wraps_many_panels_into_equal_bands(tmp_path):
    fig = draw_lr_sweep(sweep(tmp_path), max_cols=6)
    grid = fig.axes[0].get_subplotspec().get_gridspec()
    assert (grid.nrows, grid.ncols) == (4, 4)  # 8 panels: 2 bands of 4, not 6 + 2


def test_batch_size_figure_labels_percent_and_anchors_linear_scaling_at_the_smallest_b(tmp_path):
    a = sweep(tmp_path)
    fig = draw_batch_size(a)
    assert fig.axes[0].get_ylabel() == "optimal test accuracy (%)"
    (line,) = [ln for ln in fig.axes[2].get_lines() if ln.get_label().startswith("linear scaling")]
    assert line.get_label() == "linear scaling (eps ∝ B) from B = 16"
    optima = [r.by_metric.cell.lr[0] for r in a.rows if r.group[1] == 16]
    x, y = line.get_xdata(), line.get_ydata()
    assert (x[0], x[-1]) == (16, 1347)
    assert math.isclose(y[0], math.exp(sum(map(math.log, optima)) / len(optima)))
    assert math.isclose(y[-1] / y[0], 1347 / 16)


def test_panel_titles_and_the_figure_title_from_the_spec(tmp_path):
    assert panel_title("batch.global_batch_size", 16) == "B = 16" and panel_title("model.norm", "bn") == "norm = bn"
    (tmp_path / "sweep.yaml").write_text("name: demo_steps\ndescription: >-\n  MLP on digits,\n  421 steps\n")
    assert title_of(tmp_path) == "MLP on digits, 421 steps"
    assert title_of(tmp_path / "other") == "other"
