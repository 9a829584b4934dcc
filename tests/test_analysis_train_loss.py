"""Which "final training loss" the tables use (--train-loss window | train_set), and the grid-edge warnings of
BOTH selections, on hand-made result.json files."""

import csv
import io
import json

import pytest

from harness import analysis
from harness.cli import main
from tests.test_analysis import make_run, row_of


def run(root, lr, seed, metric, window, train_set, status="completed"):
    d = make_run(root, "momentum", 64, lr, seed, metric, loss=window, status=status)
    if train_set is not None:
        result = json.loads(d.joinpath("result.json").read_text())
        result.update(train_set_loss=train_set, train_set_accuracy=100.0)
        d.joinpath("result.json").write_text(json.dumps(result))
    return d


def two_losses(root):
    """The window loss is lowest at lr 0.5, the full-training-set loss at lr 1 (both inside the grid); the
    test metric is best at lr 2."""
    for lr, metric, window, train_set in ((0.25, 80.0, 0.30, 0.30), (0.5, 85.0, 0.10, 0.20), (1.0, 88.0, 0.20, 0.05),
                                          (2.0, 90.0, 0.40, 0.40), (4.0, 86.0, 0.50, 0.50)):
        for s in range(2):
            run(root, lr, s, metric + s, window + 0.01 * s, train_set + 0.01 * s)


def analyze(capsys, root, *args):
    with pytest.raises(SystemExit) as exit_:
        main(["analyze", str(root), "--k", "2", "--n", "2", "--no-figures", *args])
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def csv_rows(root, name):
    return list(csv.DictReader(io.StringIO((root / "analysis" / name).read_text())))


def test_window_is_the_default_and_says_so(tmp_path, capsys):
    two_losses(tmp_path)
    code, out, err = analyze(capsys, tmp_path)
    assert code == 0 and err == ""
    assert ("final training loss: result.json train_loss, the mean train-mode minibatch loss over the final "
            "floor(S/20) steps (--train-loss window)") in out
    assert "| Final training loss (last S/20 steps) |" in out
    assert "Selected by final training loss (last S/20 steps; sec. 7):" in out
    assert "| Optimal final training loss (last S/20 steps) |" in out
    (row,) = csv_rows(tmp_path, "table_by_train_loss.csv")
    assert row["opt_effective_lr"] == "0.5" and float(row["train_loss_mean"]) == pytest.approx(0.105)
    (row,) = csv_rows(tmp_path, "table.csv")
    assert row["opt_effective_lr"] == "2.0" and float(row["train_loss_mean"]) == pytest.approx(0.405)
    assert "Final training loss (last S/20 steps)" in (tmp_path / "analysis" / "table.tex").read_text()


def test_train_set_selects_by_the_full_training_set_loss(tmp_path, capsys):
    two_losses(tmp_path)
    code, out, err = analyze(capsys, tmp_path, "--train-loss", "train_set")
    assert code == 0 and err == ""
    assert "result.json train_set_loss, the loss over the full training set in eval mode at the end" in out
    assert "| Final training loss (train set, eval mode) |" in out
    assert "Selected by final training loss (train set, eval mode; sec. 7):" in out
    (row,) = csv_rows(tmp_path, "table_by_train_loss.csv")
    assert row["opt_effective_lr"] == "1.0" and float(row["train_set_loss_mean"]) == pytest.approx(0.055)
    assert "train_loss_mean" not in row
    (row,) = csv_rows(tmp_path, "table.csv")
    assert row["opt_effective_lr"] == "2.0" and float(row["train_set_loss_mean"]) == pytest.approx(0.405)
    cells = csv_rows(tmp_path, "cells.csv")
    assert [float(c["train_set_loss_mean"]) for c in cells][:2] == pytest.approx([0.305, 0.205])
    assert "Final training loss (train set, eval mode)" in (tmp_path / "analysis" / "table_by_train_loss.tex").read_text()


def test_a_run_without_train_set_loss_is_one_warning_and_unfinished_for_that_selection(tmp_path, capsys):
    two_losses(tmp_path)
    old = run(tmp_path, 1.0, 2, 70.0, 0.01, None)  # an older run: no train_set_loss (no eval.train_loss)
    run(tmp_path, 4.0, 2, None, None, None, status="diverged")  # diverged: a result, no warning
    code, out, err = analyze(capsys, tmp_path, "--train-loss", "train_set", "--n", "3")
    assert code == 0
    assert err.strip().splitlines() == [
        f"harness: warning: {old}: no train_set_loss in result.json (its config had no eval.train_loss: true): it "
        "counts as unfinished for the selection by training loss; train it with eval.train_loss: true, or use "
        "--train-loss window"]
    a = analysis.analyze(tmp_path, k=2, n=3, train_loss="train_set")
    cell = {c.lr[0]: c for c in row_of(a).cells}[1.0]
    assert cell.n_finished == 3 and cell.n_missing_train == 1
    assert cell.by_loss.k == 2 and cell.by_loss.mean == pytest.approx(0.055)  # the two runs that have it
    assert row_of(a).by_loss.cell is cell
    assert "1 without train_set_loss" in out
    # Under the window nothing is missing, and the old run's window loss (0.01) wins the cell.
    code, out, err = analyze(capsys, tmp_path, "--n", "3")
    assert code == 0 and err == ""
    a = analysis.analyze(tmp_path, k=2, n=3)
    assert {c.lr[0]: c for c in row_of(a).cells}[1.0].by_loss.mean == pytest.approx(0.105)


def test_metric_table_shows_na_when_the_best_runs_lack_train_set_loss(tmp_path, capsys):
    for lr, metric in ((0.5, 80.0), (1.0, 90.0), (2.0, 85.0)):
        for s in range(2):
            run(tmp_path, lr, s, metric + s, 0.1, None if lr == 1.0 else 0.2)
    code, out, err = analyze(capsys, tmp_path, "--train-loss", "train_set")
    assert code == 0 and len(err.strip().splitlines()) == 2
    assert "| momentum | 64 | 2 | 90.5 ± 0.7 | n/a | 2^0 (2^0 to 2^0) | 2 without train_set_loss |" in out


def edge_sweep(root):
    """The test metric's optimum is inside the grid; the training loss is lowest at the smallest rate (B = 64),
    and at B = 128 its optimum is inside but its error bar reaches the largest rate."""
    for b, losses in ((64, (0.01, 0.05, 0.10, 0.20)), (128, (0.30, 0.10, 0.11, 0.105))):
        for lr, metric, loss in zip((0.5, 1.0, 2.0, 4.0), (80.0, 90.0, 85.0, 70.0), losses):
            for s in range(2):
                make_run(root, "momentum", b, lr, s, metric + s, loss=loss + 0.01 * s)


def test_grid_edge_warnings_for_both_selections(tmp_path, capsys):
    edge_sweep(tmp_path)
    code, out, err = analyze(capsys, tmp_path)
    assert code == 0
    report = out.split("Selected by")[0]
    assert "- momentum, 64: training-loss optimum or error bar at the grid edge (low): extend the grid" in report
    assert "- momentum, 128: training-loss optimum or error bar at the grid edge (high): extend the grid" in report
    assert "test-metric optimum" not in report  # the metric's optimum and error bar are inside
    loss_table = out.split("Selected by final training loss")[1]
    assert "| momentum | 64 | 2 | 0.015 ± 0.007 | 80.5 ± 0.7 | 2^-1 (2^-1 to 2^-1) | edge: low, extend the grid |" in loss_table
    assert "edge: high, extend the grid" in loss_table
    assert [r["edge_warning"] for r in csv_rows(tmp_path, "table_by_train_loss.csv")] == ["low", "high"]
    assert [r["edge_warning"] for r in csv_rows(tmp_path, "table.csv")] == ["", ""]
    a = analysis.analyze(tmp_path, k=2, n=2)
    assert row_of(a, b=128).by_loss.cell.lr == (1.0,) and row_of(a, b=128).by_loss.high == (4.0,)


def test_a_bad_train_loss_choice_is_a_one_line_error(tmp_path, capsys):
    two_losses(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["analyze", str(tmp_path), "--train-loss", "final"])
    assert exit_.value.code == 2 and "invalid choice: 'final'" in capsys.readouterr().err


def test_the_trainer_writes_train_set_loss_the_analysis_reads(tmp_path, capsys, digits_shards):
    """eval.train_loss: true makes the trainer evaluate the whole training set in eval mode at the end; the
    analysis then selects by it with --train-loss train_set."""
    from harness.train.config import load_config
    from harness.train.trainer import train

    for lr in (0.25, 0.5, 1.0):
        cfg = load_config(None, ["data.name=digits", f"data.path={digits_shards}", "model.name=mlp",
                                 "model.hidden=[16]", "batch.global_batch_size=128", "budget.steps=20",
                                 f"optim.effective_lr={lr}", "eval.train_loss=true", "log.progress=false",
                                 "log.tensorboard=false", "device=cpu"])
        result = train(cfg, tmp_path / f"lr{lr}")
        assert 0 < result["train_set_loss"] < 10 and 0 <= result["train_set_accuracy"] <= 100
        assert result["train_set_loss"] != result["train_loss"]  # eval mode, no augmentation: another quantity
    code, out, _ = analyze(capsys, tmp_path, "--train-loss", "train_set", "--k", "1", "--n", "1")
    assert code == 0 and "train_set" in out
