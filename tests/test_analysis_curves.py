"""Fig. 10(d): the test metric during training at two learning rates, all seeds, from metrics.jsonl; the rates
are the optima by test metric and by training loss at the largest epoch budget, or --curves-lr."""

import json

import pytest

from harness import analysis
from harness.analysis import curves, figures
from harness.cli import main
from harness.core.errors import SweepError
from tests.test_analysis import make_run

STEPS_PER_EPOCH = 20


def mse_at(lr, epoch, budget, seed):
    """Overfitting that starts sooner at the larger rate (appendix E): the MSE falls, then rises with lr."""
    return 3.0 + lr * 100 * (epoch / budget - 0.3) ** 2 + 0.01 * seed


def autoencoder_sweep(root, evaluate=True):
    """B = 32, epoch budgets 20 and 40, rates 0.002 / 0.004 / 0.008, 3 seeds, an evaluation every 10 epochs.
    At 40 epochs the final test MSE is lowest at 0.002; the training loss lowest at 0.008."""
    for budget in (20, 40):
        for lr in (0.002, 0.004, 0.008):
            for s in range(3):
                final = mse_at(lr, budget, budget, s)
                d = make_run(root, "momentum", 32, lr, s, final, loss=2.0 - 50 * lr + 0.01 * s,
                             metric_name="test_mse", higher=False, epochs=budget)
                lines = []
                for epoch in range(5, budget + 1, 5):
                    step = epoch * STEPS_PER_EPOCH
                    lines.append({"step": step, "epoch": float(epoch), "train_loss": 2.5 - epoch / budget, "lr": lr / 10})
                    if evaluate and epoch % 10 == 0 or epoch == budget:
                        value = mse_at(lr, epoch, budget, s)
                        lines.append({"step": step, "test_loss": value, "test_mse": value})
                d.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_the_two_rates_at_the_largest_budget(tmp_path):
    autoencoder_sweep(tmp_path)
    a = analysis.analyze(tmp_path, k=2, n=3)
    (panel,) = curves.panels(a)
    assert panel.group == ("momentum", 32, 40)
    picked = curves.chosen(a, panel)
    assert [(c.lr, why) for c, why in picked] == [((0.002,), "optimal by test mse"), ((0.008,), "optimal by training loss")]
    drawn = curves.collect(a)
    (row, (by_metric, by_loss)) = drawn[0]
    assert by_metric.x == "epoch" and len(by_metric.seeds) == 3 and len(by_loss.seeds) == 3
    assert [x for x, _ in by_loss.seeds[0]] == [10.0, 20.0, 30.0, 40.0]
    for x, mean in by_loss.mean:  # the thick line: the mean of the seeds at each evaluation
        assert mean == pytest.approx(sum(mse_at(0.008, x, 40, s) for s in range(3)) / 3)


def test_one_curve_when_both_selections_agree_and_curves_lr_overrides(tmp_path):
    autoencoder_sweep(tmp_path)
    a = analysis.analyze(tmp_path, k=2, n=3)
    row = curves.panels(a)[0]
    row.by_loss = row.by_metric
    assert [why for _, why in curves.chosen(a, row)] == ["optimal by test mse and by training loss"]
    picked = curves.chosen(a, row, curves.parse_rates("0.004,0.008"))
    assert [c.lr for c, _ in picked] == [(0.004,), (0.008,)]
    with pytest.raises(SweepError, match=r"--curves-lr 0.003: no such effective learning rate .* "
                                                          r"\(it has 0.002, 0.004, 0.008\)"):
        curves.chosen(a, row, [0.003])
    for bad in ("fast", "0.1,-1", ""):
        with pytest.raises(SweepError, match="expected positive effective learning rates"):
            curves.parse_rates(bad)


def test_the_figure_draws_every_seed_thin_and_the_mean_thick(tmp_path, monkeypatch):
    autoencoder_sweep(tmp_path)
    a = analysis.analyze(tmp_path, k=2, n=3)
    shown = {}

    def keep(fig, out, stem, title=""):
        shown["fig"] = fig
        return [out / f"{stem}.png"]

    monkeypatch.setattr(figures, "_save", keep)
    assert [p.name for p in figures.curves_figure(a, tmp_path)] == ["curves.png"]
    (ax,) = shown["fig"].axes
    widths = sorted(line.get_linewidth() for line in ax.lines)
    assert widths.count(0.7) == 6 and widths.count(2.4) == 2  # 3 seeds x 2 rates, 2 means
    (drop,) = [line for line in ax.lines if line.get_linestyle() == ":"]
    assert list(drop.get_xdata()) == [20.0, 20.0]  # the first rate drop, at half of the 40 epochs
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "eps_eff 0.002: optimal by test mse (3 seeds, mean thick)"
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "test mse during training"


def test_cli_writes_curves_and_says_when_there_are_none(tmp_path, capsys):
    autoencoder_sweep(tmp_path / "evaluated")
    with pytest.raises(SystemExit) as exit_:
        main(["analyze", str(tmp_path / "evaluated"), "--k", "2", "--n", "3", "--curves-lr", "0.004,0.002"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "curves.png, curves.svg" in out
    assert (tmp_path / "evaluated" / "analysis" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    autoencoder_sweep(tmp_path / "final_only", evaluate=False)  # only the final evaluation: no curve to draw
    with pytest.raises(SystemExit) as exit_:
        main(["analyze", str(tmp_path / "final_only"), "--k", "2", "--n", "3", "--curves-lr", "0.004"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "curves.png" not in out.splitlines()[-1]
    assert "no curves.png: the runs of those rates have no evaluations during training" in out
    with pytest.raises(SystemExit) as exit_:
        main(["analyze", str(tmp_path / "evaluated"), "--curves-lr", "0.005"])
    err = capsys.readouterr().err
    assert exit_.value.code == 7 and len(err.strip().splitlines()) == 1 and "no such effective learning rate" in err


def test_a_diverged_seed_is_drawn_not_averaged_and_curves_read_from_an_export(tmp_path, capsys):
    autoencoder_sweep(tmp_path / "sweep")
    run = make_run(tmp_path / "sweep", "momentum", 32, 0.008, 5, None, status="diverged", metric_name="test_mse",
                   higher=False, epochs=40)
    run.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 200, "epoch": 10.0, "train_loss": 9.0}, {"step": 200, "test_mse": 50.0, "test_loss": 50.0},
        {"step": 400, "epoch": 20.0, "train_loss": float("nan")})) + '{"step": 40')  # cut mid-write
    a = analysis.analyze(tmp_path / "sweep", k=2, n=3)
    (_, (_, by_loss)), = curves.collect(a)
    assert len(by_loss.seeds) == 4 and [(10.0, 50.0)] in by_loss.seeds
    assert by_loss.mean[0][1] == pytest.approx(sum(mse_at(0.008, 10, 40, s) for s in range(3)) / 3)
    with pytest.raises(SystemExit):
        main(["analyze", str(tmp_path / "sweep"), "--k", "2", "--n", "3", "--no-figures",
              "--export", "batch-science", str(tmp_path / "bs")])
    capsys.readouterr()
    b = analysis.analyze(tmp_path / "bs", k=2, n=3)
    (_, (m2, l2)), = curves.collect(b)
    (_, (m1, l1)), = curves.collect(a)
    assert (m2.seeds, m2.mean, l2.mean) == (m1.seeds, m1.mean, l1.mean)
