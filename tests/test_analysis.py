"""The paper's analysis protocol on hand-made run directories whose answers are known."""

import csv
import io
import json

import pytest

import yaml
from harness import analysis
from harness.core.errors import SweepError
from tests.conftest import run_harness


def make_run(root, opt, b, lr, seed, metric, loss=0.5, status="completed", metric_name="test_accuracy",
             higher=True, **extra):
    """A run directory as the trainer leaves it: config.yaml (nested) and, if finished, result.json."""
    name = f"{opt}-B{b}-lr{lr:g}-s{seed}" + "".join(f"-{k}{v}" for k, v in extra.items())
    d = root / name
    d.mkdir(parents=True)
    config = {"seed": seed, "optim": {"name": opt, "effective_lr": float(lr)}, "batch": {"global_batch_size": b},
              "schedule": {"final_lr": extra.pop("final_lr", None)}, "budget": {"steps": None, "epochs": extra.pop("epochs", 10)},
              "data": {"path": f"/data/{seed}"}, "log": {"every_steps": seed + 1}}  # layout keys vary: ignored
    d.joinpath("config.yaml").write_text(yaml.safe_dump(config))
    if status is None:
        return d  # started, never finished
    diverged = status == "diverged"
    d.joinpath("result.json").write_text(json.dumps({
        "status": status, "test_metric": metric_name, "higher_is_better": higher,
        metric_name: None if diverged else metric, "train_loss": None if diverged else loss}))
    return d


def cell(root, opt, b, lr, metrics, losses=None, statuses=None, **kw):
    for s, m in enumerate(metrics):
        make_run(root, opt, b, lr, s, m, (losses or [0.5] * len(metrics))[s], (statuses or ["completed"] * len(metrics))[s], **kw)


def row_of(a, opt="momentum", b=64):
    (row,) = [r for r in a.rows if r.group[:2] == (opt, b)]
    return row


def test_best_k_mean_std_error_bar_spanning_several_lrs(tmp_path):
    # k = 3 of n = 4: the worst seed of each lr is dropped.
    cell(tmp_path, "momentum", 64, 0.25, [80.0, 81.0, 82.0, 10.0])
    cell(tmp_path, "momentum", 64, 0.5, [89.0, 90.0, 91.0, 50.0])  # mean 90, std 1
    cell(tmp_path, "momentum", 64, 1.0, [88.9, 89.5, 90.1, 0.0])  # mean 89.5: within one std
    cell(tmp_path, "momentum", 64, 2.0, [88.0, 89.2, 90.4, 1.0])  # mean 89.2: within one std
    cell(tmp_path, "momentum", 64, 4.0, [86.0, 87.0, 88.0, 1.0])  # mean 87: outside
    a = analysis.analyze(tmp_path, k=3, n=4)
    assert a.group_keys == ["optim.name", "batch.global_batch_size"] and a.lr_keys == ["optim.effective_lr"]
    opt = row_of(a).by_metric
    assert opt.cell.lr == (0.5,) and opt.stats.mean == pytest.approx(90.0) and opt.stats.std == pytest.approx(1.0)
    assert (opt.low, opt.high) == ((0.5,), (2.0,)) and opt.bar == [(0.5,), (1.0,), (2.0,)]
    assert opt.edge == ""
    header, rows = analysis.table_rows(a, "metric")
    assert header == ["optimizer", "batch_size", "n_runs", "k", "metric_mean", "metric_std", "train_loss_mean",
                      "opt_effective_lr", "opt_effective_lr_low", "opt_effective_lr_high", "edge_warning"]
    text = analysis.to_csv(a)
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert text.splitlines()[0] == ",".join(header)
    assert parsed[0]["opt_effective_lr"] == "0.5" and parsed[0]["opt_effective_lr_high"] == "2.0"
    assert parsed[0]["n_runs"] == "4" and parsed[0]["k"] == "3" and parsed[0]["edge_warning"] == ""
    md = analysis.to_markdown(a)
    assert "| momentum | 64 | 4 | 90.0 ± 1.0 | 0.500 ± 0.000 | 2^-1 (2^-1 to 2^1) |" in md
    assert "$2^{-1}$ ($2^{-1}$ to $2^{1}$)" in analysis.to_latex(a)


def test_ties_choose_the_smaller_learning_rate_and_share_the_error_bar(tmp_path):
    cell(tmp_path, "sgd", 64, 0.5, [70.0, 71.0])
    cell(tmp_path, "sgd", 64, 1.0, [92.0, 94.0])
    cell(tmp_path, "sgd", 64, 2.0, [94.0, 92.0])  # the same mean and std as 1.0
    cell(tmp_path, "sgd", 64, 4.0, [60.0, 61.0])
    opt = row_of(analysis.analyze(tmp_path, k=2, n=2), "sgd").by_metric
    assert opt.cell.lr == (1.0,) and opt.stats.mean == 93.0
    assert (opt.low, opt.high) == ((1.0,), (2.0,))


def test_diverged_runs_count_as_the_worst_value(tmp_path):
    # lr 1: one diverged run of four, outside the best 3: the mean uses the three completed runs.
    cell(tmp_path, "momentum", 64, 0.5, [90.0, 90.0, 90.0, 90.0])
    cell(tmp_path, "momentum", 64, 1.0, [95.0, 95.0, 95.0, None], statuses=["completed"] * 3 + ["diverged"])
    # lr 2: two diverged of four, so one is INSIDE the best 3: the cell is the worst possible, never optimal,
    # however good its completed runs are.
    cell(tmp_path, "momentum", 64, 2.0, [99.0, 99.0, None, None], statuses=["completed"] * 2 + ["diverged"] * 2)
    cell(tmp_path, "momentum", 64, 4.0, [None] * 4, statuses=["diverged"] * 4)
    a = analysis.analyze(tmp_path, k=3, n=4)
    row = row_of(a)
    cells = {c.lr[0]: c for c in row.cells}
    assert cells[1.0].n_diverged == 1 and cells[1.0].by_metric.mean == 95.0 and not cells[1.0].by_metric.diverged_in_best
    assert cells[2.0].n_diverged == 2 and cells[2.0].by_metric.diverged_in_best and cells[2.0].by_metric.mean == float("-inf")
    assert row.by_metric.cell.lr == (1.0,)
    md = analysis.to_markdown(a)
    assert "1 diverged" in md  # shown beside the optimum
    listing = list(csv.DictReader(io.StringIO(analysis.cells_csv(a))))
    assert [(r["effective_lr"], r["n_diverged"], r["diverged_in_best_k"]) for r in listing] == [
        ("0.5", "0", "False"), ("1.0", "1", "False"), ("2.0", "2", "True"), ("4.0", "4", "True")]
    # The optimum's error bar and edge ignore diverged cells; the grid still extends to 4: no edge warning.
    assert row.by_metric.edge == ""


def test_optimum_on_the_grid_edge_is_flagged(tmp_path):
    cell(tmp_path, "momentum", 64, 0.5, [80.0, 81.0])
    cell(tmp_path, "momentum", 64, 1.0, [85.0, 86.0])
    cell(tmp_path, "momentum", 64, 2.0, [90.0, 91.0])  # the largest rate of the grid wins
    cell(tmp_path, "momentum", 128, 0.5, [90.0, 91.0])  # the smallest rate wins
    cell(tmp_path, "momentum", 128, 1.0, [89.0, 90.2])  # 0.9 below the best mean: outside its one std (0.71)
    cell(tmp_path, "momentum", 128, 2.0, [80.0, 81.0])
    a = analysis.analyze(tmp_path, k=2, n=2)
    assert row_of(a, b=64).by_metric.edge == "high"
    assert row_of(a, b=128).by_metric.edge == "low"
    assert any("grid edge (high)" in f for f in row_of(a, b=64).flags)
    rows = list(csv.DictReader(io.StringIO(analysis.to_csv(a))))
    assert [r["edge_warning"] for r in rows] == ["high", "low"]
    assert "edge: high" in analysis.to_markdown(a)


def test_selection_by_training_loss_is_separate(tmp_path):
    # The largest rate generalizes best; the smallest fits the training set best (sec. 7, fig. 2c).
    cell(tmp_path, "momentum", 64, 0.25, [85.0, 85.0], losses=[0.01, 0.02])
    cell(tmp_path, "momentum", 64, 0.5, [88.0, 88.0], losses=[0.05, 0.05])
    cell(tmp_path, "momentum", 64, 1.0, [93.0, 93.0], losses=[0.20, 0.30])
    cell(tmp_path, "momentum", 64, 2.0, [91.0, 91.0], losses=[0.40, 0.40])
    a = analysis.analyze(tmp_path, k=2, n=2)
    row = row_of(a)
    assert row.by_metric.cell.lr == (1.0,) and row.by_metric.stats.other_mean == pytest.approx(0.25)
    assert row.by_loss.cell.lr == (0.25,) and row.by_loss.stats.mean == pytest.approx(0.015)
    assert row.by_loss.stats.other_mean == 85.0 and row.by_loss.edge == "low"
    header, rows = analysis.table_rows(a, "train_loss")
    assert header[:7] == ["optimizer", "batch_size", "n_runs", "k", "train_loss_mean", "train_loss_std", "metric_mean"]
    assert rows[0][7] == 0.25


def test_lower_is_better_metric_too_few_runs_and_epoch_groups(tmp_path):
    kw = dict(metric_name="test_perplexity", higher=False)
    for e in (10, 20):
        cell(tmp_path, "momentum", 64, 1.0, [90.0, 91.0, 92.0], epochs=e, **kw)
        cell(tmp_path, "momentum", 64, 2.0, [80.0, 81.0, 82.0], epochs=e, **kw)
        cell(tmp_path, "momentum", 64, 4.0, [85.0, 86.0, 87.0], epochs=e, **kw)
    make_run(tmp_path, "momentum", 64, 2.0, 3, None, status=None, epochs=10)  # started, not finished
    a = analysis.analyze(tmp_path, k=2, n=4)
    assert a.group_keys == ["optim.name", "batch.global_batch_size", "budget.epochs"] and not a.higher_is_better
    assert a.n_unfinished == 1
    for row in a.rows:
        assert row.by_metric.cell.lr == (2.0,) and row.by_metric.stats.mean == 80.5  # the best two: 80, 81
        assert any("fewer than n=4 finished runs" in f for f in row.flags)
    assert analysis.to_csv(a).splitlines()[0].startswith("optimizer,batch_size,epochs,n_runs,k,metric_mean")
    assert "80.50 ± 0.71" in analysis.to_markdown(a)


def test_final_lr_is_a_second_learning_rate_axis(tmp_path):
    for lr0 in (0.5, 1.0, 2.0):
        for lrf in (0.001, 0.01, 0.1):
            good = 90.0 + (lr0 == 1.0) * 3 + (lrf == 0.01) * 2
            cell(tmp_path, "momentum", 64, lr0, [good, good - 1], final_lr=lrf)
    a = analysis.analyze(tmp_path, k=2, n=2)
    assert a.lr_keys == ["optim.effective_lr", "schedule.final_lr"]
    opt = row_of(a).by_metric
    assert opt.cell.lr == (1.0, 0.01) and opt.edge == ""
    assert analysis.table_rows(a, "metric")[0][-4:] == ["opt_final_lr", "opt_final_lr_low", "opt_final_lr_high", "edge_warning"]


def test_mixed_metrics_and_empty_directories_are_clear_errors(tmp_path):
    with pytest.raises(SweepError, match="no run directories"):
        analysis.analyze(tmp_path)
    make_run(tmp_path, "sgd", 64, 1.0, 0, 90.0)
    make_run(tmp_path, "sgd", 64, 1.0, 1, 90.0, metric_name="test_perplexity", higher=False)
    with pytest.raises(SweepError, match="different test metrics"):
        analysis.analyze(tmp_path)


@pytest.mark.slow
def test_cli_analyze_writes_tables_and_figures_and_prints_the_paper_beside(tmp_path):
    for b, best in ((256, 2.0), (512, 4.0)):
        for lr in (1.0, 2.0, 4.0, 8.0):
            cell(tmp_path, "momentum", b, lr, [93.0 + (lr == best), 92.5 + (lr == best)])
    proc = run_harness("analyze", tmp_path, "--k", "2", "--n", "2", "--reference", "paper:table1")
    out = proc.stdout
    assert "| momentum | 256 | 2 | 93.8 ± 0.4 |" in out
    assert "| momentum | 256 | 93.8 ± 0.4 | 93.5 ± 0.1 |" in out  # ours beside table 1's
    assert "2^1 (2^1 to 2^1) | 2^2 (2^1 to 2^2) |" in out
    files = {p.name for p in (tmp_path / "analysis").iterdir()}
    assert {"table.md", "table.csv", "table.tex", "table_by_train_loss.csv", "cells.csv", "batch_size.png",
            "batch_size.svg", "lr_sweep.png", "lr_sweep.svg"} <= files
    assert (tmp_path / "analysis" / "batch_size.png").read_bytes()[:4] == b"\x89PNG"
    bad = run_harness("analyze", tmp_path, "--reference", "paper:table9", check=False)
    assert bad.returncode == 7 and "available: paper:table1" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_epoch_budget_sweep_draws_the_epoch_figures(tmp_path):
    from harness.analysis.figures import write_figures

    for e in (50, 100, 200):
        for lr0 in (0.5, 1.0):
            for lrf in (0.001, 0.01):
                cell(tmp_path, "momentum", 64, lr0, [90.0 + e / 100 + lr0, 89.0 + e / 100], losses=[1 / e, 2 / e],
                     epochs=e, final_lr=lrf)
    a = analysis.analyze(tmp_path, k=2, n=2)
    assert a.extra_keys == ["budget.epochs"] and a.lr_keys == ["optim.effective_lr", "schedule.final_lr"]
    paths = write_figures(a, tmp_path / "figs", title="fig3-like")
    assert {p.name for p in paths} == {"epochs.png", "epochs.svg", "lr_sweep.png", "lr_sweep.svg"}
    assert b"<svg" in (tmp_path / "figs" / "epochs.svg").read_bytes()[:400]
