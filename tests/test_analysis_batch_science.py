"""Shallue et al.'s batch_science layout: `harness analyze SWEEP --export batch-science DIR` writes it from
hand-made run directories, `harness analyze DIR` reads it back to the same tables, and their own format (no
harness keys) is read too."""

import csv
import io
import json

import pytest

import yaml
from harness.cli import main
from tests.test_analysis import make_run

STEPS_PER_EPOCH = 10


def metrics_jsonl(d, epochs, lr, momentum, final_accuracy, diverge_at=None):
    """metrics.jsonl as the trainer writes it: a training record every 5 steps, an evaluation every epoch."""
    lines = []
    for step in range(5, epochs * STEPS_PER_EPOCH + 1, 5):
        loss = float("nan") if diverge_at and step >= diverge_at else 2.0 / (1 + step / 20)
        lines.append({"step": step, "epoch": step / STEPS_PER_EPOCH, "train_loss": loss, "train_accuracy": 50 + step / 4,
                      "lr": lr * (1 - momentum), "effective_lr": lr, "temperature": lr / 64, "grad_norm": 1.5})
        if diverge_at and step >= diverge_at:
            break
        if step % STEPS_PER_EPOCH == 0:
            acc = final_accuracy - 10.0 / (step / STEPS_PER_EPOCH)
            lines.append({"step": step, "test_loss": (100 - acc) / 50, "test_accuracy": acc})
    d.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def harness_run(root, opt, b, lr, s, acc, norm, status="completed", loss=0.5):
    """A run directory of a WRN-like config (model.norm swept), with momentum and weight decay in its config."""
    d = make_run(root, opt, b, lr, s, acc, loss=loss, status=status, norm=norm, epochs=4)
    config = yaml.safe_load(d.joinpath("config.yaml").read_text())
    config["model"] = {"name": "wrn", "norm": norm}
    config["data"]["name"] = "cifar10"
    config["optim"].update(momentum=0.9, weight_decay=5e-4)
    d.joinpath("config.yaml").write_text(yaml.safe_dump(config))
    return d


def study_sweep(root):
    """SGD and Momentum, B 64 and 128, 3 rates, 3 seeds, 2 normalizations (an extra swept key), 4 epochs; 4
    diverged runs, one unfinished run, train_set_loss in every completed run."""
    for opt, m in (("sgd", 0.0), ("momentum", 0.9)):
        for b in (64, 128):
            for norm in ("bn", "none"):
                for lr in (0.5, 1.0, 2.0):
                    for s in range(3):
                        acc = 90 - 3 * abs(lr - 1.0) * (b / 64) + s * 0.2 + (norm == "bn")
                        diverged = lr == 2.0 and b == 128 and opt == "sgd" and s < 2
                        d = harness_run(root, opt, b, lr, s, acc, norm, "diverged" if diverged else "completed",
                                        loss=0.05 * lr + 0.01 * s)
                        result = json.loads(d.joinpath("result.json").read_text())
                        if not diverged:
                            result.update(train_set_loss=0.04 * lr + 0.02 * s, train_set_accuracy=99.0 - s,
                                          steps=40, total_steps=40, epochs=4.0)
                        d.joinpath("result.json").write_text(json.dumps(result))
                        metrics_jsonl(d, 4, lr, m, acc, diverge_at=15 if diverged else None)
    unfinished = harness_run(root, "momentum", 64, 1.0, 7, None, "bn", status=None)
    metrics_jsonl(unfinished, 2, 1.0, 0.9, 80.0)
    return root


def analyze(capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        main(["analyze", *map(str, args)])
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


TABLES = ("table.csv", "table_by_train_loss.csv", "cells.csv")


def tables(d):
    return {name: (d / "analysis" / name).read_text() for name in TABLES}


@pytest.mark.parametrize("train_loss", ["window", "train_set"])
def test_export_and_read_back_gives_the_same_tables(tmp_path, capsys, train_loss):
    sweep = study_sweep(tmp_path / "sweep")
    dest = tmp_path / "export"
    args = ("--k", "2", "--n", "3", "--no-figures", "--train-loss", train_loss)
    code, out, err = analyze(capsys, sweep, *args, "--export", "batch-science", dest)
    assert code == 0 and "Traceback" not in err
    assert "exported 73 trials (68 COMPLETE, 4 INFEASIBLE, 1 INCOMPLETE) in 4 studies" in out
    code, out2, err2 = analyze(capsys, dest, *args)
    assert code == 0, err2
    assert "read from a batch-science layout" in out2.splitlines()[0]
    assert tables(dest) == tables(sweep)
    assert printed_tables(out2) == printed_tables(out)


def printed_tables(out):
    """What `harness analyze` printed after the report's first line, up to its closing lines."""
    lines = out.splitlines()[1:]
    end = next(i for i, line in enumerate(lines) if line.startswith(("exported", "wrote")))
    return lines[:end]


def test_the_layout_matches_their_readme(tmp_path, capsys):
    sweep = study_sweep(tmp_path / "sweep")
    dest = tmp_path / "export"
    code, out, err = analyze(capsys, sweep, "--no-figures", "--export", "batch-science", dest)
    assert code == 0, err
    studies = sorted(p.parent.relative_to(dest).as_posix() for p in dest.rglob("study.json"))
    assert studies == ["cifar10/wrn/momentum/128", "cifar10/wrn/momentum/64", "cifar10/wrn/sgd/128", "cifar10/wrn/sgd/64"]
    study_dir = dest / "cifar10/wrn/momentum/64"
    study = json.loads((study_dir / "study.json").read_text())
    assert {k: study[k] for k in ("batch_size", "dataset", "model", "optimizer", "early_stopping", "train_steps")} == {
        "batch_size": 64, "dataset": "cifar10", "model": "wrn", "optimizer": "momentum", "early_stopping": False,
        "train_steps": 40}
    assert study["parameter_configs"]["effective_learning_rate"] == {"type": "DISCRETE", "feasible_points": [0.5, 1.0, 2.0]}
    assert study["parameter_configs"]["model.norm"]["feasible_points"] == ["bn", "none"]
    trials = sorted((d for d in study_dir.iterdir() if d.is_dir()), key=lambda d: int(d.name))  # their loader's order
    assert [int(d.name) for d in trials] == list(range(1, 20))  # 2 norms x 3 rates x 3 seeds + the unfinished run
    statuses = {}
    for d in trials:
        meta = json.loads((d / "metadata.json").read_text())
        assert meta["trial_id"] == int(d.name) and meta["_internal_trial_id"] == int(d.name)
        p = meta["parameters"]
        assert p["momentum"] == 0.9 and p["learning_rate"] == pytest.approx(p["effective_learning_rate"] * 0.1)
        assert p["batch_size"] == 64 and p["weight_decay"] == 5e-4 and p["epoch_budget"] == 4
        statuses[meta["harness"]["run"]] = meta["status"]
        rows = list(csv.DictReader(io.StringIO((d / "measurements.csv").read_text())))
        assert rows and all(r["step"].isdigit() for r in rows)
    assert statuses["momentum-B64-lr1-s7-normbn-epochs4"] == "INCOMPLETE"
    assert set(statuses.values()) == {"COMPLETE", "INCOMPLETE"}
    sgd = dest / "cifar10/wrn/sgd/128"
    metas = [json.loads(p.read_text()) for p in sgd.glob("*/metadata.json")]
    assert sum(m["status"] == "INFEASIBLE" for m in metas) == 4  # 2 seeds x 2 norms at lr 2
    assert all(m["parameters"]["momentum"] == 0.0 and m["parameters"]["learning_rate"] == m["parameters"]
               ["effective_learning_rate"] for m in metas)
    one = next(d for d in trials if json.loads((d / "metadata.json").read_text())["harness"]["run"] == "momentum-B64-lr1-s0-normbn-epochs4")
    rows = list(csv.DictReader(io.StringIO((one / "measurements.csv").read_text())))
    assert len(rows) == 8  # a row per step logged: 5, 10, ..., 40
    assert rows[1]["test/accuracy"] and float(rows[1]["test/classification_error"]) == pytest.approx(1 - float(rows[1]["test/accuracy"]) / 100)
    assert float(rows[1]["test/cross_entropy_error"]) == float(rows[1]["test/loss"]) and rows[0]["test/loss"] == ""
    assert float(rows[0]["learning_rate"]) == pytest.approx(0.1) and rows[0]["epoch"] == "0.5"


def test_export_is_atomic_and_refuses_a_foreign_directory(tmp_path, capsys):
    sweep = study_sweep(tmp_path / "sweep")
    dest = tmp_path / "export"
    assert analyze(capsys, sweep, "--no-figures", "--export", "batch-science", dest)[0] == 0
    first = sorted(p.relative_to(dest) for p in dest.rglob("*"))
    for d in list(sweep.glob("momentum-B64-*")):
        d.rename(tmp_path / d.name)  # fewer runs: the export is replaced whole, nothing of the old one remains
    assert analyze(capsys, sweep, "--no-figures", "--export", "batch-science", dest)[0] == 0
    second = sorted(p.relative_to(dest) for p in dest.rglob("*"))
    assert second and not any(str(p).startswith("cifar10/wrn/momentum/64") for p in second) and len(second) < len(first)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary directory left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("do not replace me")
    code, out, err = analyze(capsys, sweep, "--no-figures", "--export", "batch-science", tmp_path / "mine")
    assert code == 7 and err.strip() == (f"harness: error: --export: {tmp_path / 'mine'} exists and is not a "
                                         "batch-science export; choose a new directory")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "do not replace me"
    code, out, err = analyze(capsys, sweep, "--no-figures", "--export", "csv", tmp_path / "x")
    assert code == 7 and "unknown format" in err and len(err.strip().splitlines()) == 1


def test_a_broken_trial_is_one_warning(tmp_path, capsys):
    sweep = study_sweep(tmp_path / "sweep")
    dest = tmp_path / "export"
    assert analyze(capsys, sweep, "--no-figures", "--export", "batch-science", dest)[0] == 0
    trial = dest / "cifar10/wrn/sgd/64/3"
    (trial / "metadata.json").write_text('{"status": "COMPL')
    (dest / "cifar10/wrn/sgd/64/notes").mkdir()  # not a trial: no metadata.json, no measurements.csv
    code, out, err = analyze(capsys, dest, "--no-figures")
    assert code == 0 and err.count("\n") == 1 and err.startswith(f"harness: warning: skipped {trial}: metadata.json")


def their_study(root, b, trials):
    """A study exactly as their README shows it: no harness keys, errors as fractions."""
    d = root / "mnist" / "simple_cnn" / "nesterov_momentum" / str(b)
    d.mkdir(parents=True)
    d.joinpath("study.json").write_text(json.dumps({
        "batch_size": b, "dataset": "mnist", "early_stopping": False, "model": "simple_cnn",
        "optimizer": "nesterov_momentum", "train_steps": 1000,
        "parameter_configs": {"learning_rate": {"max_value": 10.0, "min_value": 0.0001, "scale": "LOG_SCALE", "type": "DOUBLE"}}}))
    for i, (lr, status, errors) in enumerate(trials, start=1):
        t = d / str(i)
        t.mkdir()
        t.joinpath("metadata.json").write_text(json.dumps({
            "_internal_study_name": "x", "_internal_trial_id": i, "trial_id": i, "status": status, "steps": 1000,
            "parameters": {"learning_rate": lr, "momentum": 0.9, "label_smoothing": 0.01}}))
        lines = ["step,train/cross_entropy_error,train/classification_error,val/classification_error,"
                 "test/cross_entropy_error,test/classification_error"]
        for step, (train, test) in zip((0, 500, 1000), errors):
            lines.append(f"{step},{train},{train / 10},0.5,{test * 3},{test}")
        t.joinpath("measurements.csv").write_text("\n".join(lines) + "\n")


def test_their_own_format_is_read(tmp_path, capsys):
    their_study(tmp_path, 64, [(0.01, "COMPLETE", [(2.0, 0.9), (0.5, 0.10), (0.2, 0.02)]),
                               (0.02, "COMPLETE", [(2.0, 0.9), (0.4, 0.08), (0.1, 0.01)]),
                               (0.04, "INFEASIBLE", [(2.0, 0.9)]),
                               (0.08, "INCOMPLETE", [(2.0, 0.9)])])
    code, out, err = analyze(capsys, tmp_path, "--k", "1", "--n", "1", "--no-figures", "--train-loss", "train_set")
    assert code == 0, err
    assert "4 runs (3 finished, 1 unfinished); metric test_accuracy (higher is better)" in out
    rows = list(csv.DictReader(io.StringIO((tmp_path / "analysis" / "table.csv").read_text())))
    # eps_eff = lr / (1 - m) = 0.2 (their learning_rate 0.02); accuracy 100 (1 - 0.01) at the last step.
    assert rows[0]["optimizer"] == "nesterov_momentum" and float(rows[0]["metric_mean"]) == pytest.approx(99.0)
    assert float(rows[0]["opt_effective_lr"]) == pytest.approx(0.2)
    assert float(rows[0]["train_set_loss_mean"]) == pytest.approx(0.1)  # train/cross_entropy_error, last row
    cells = list(csv.DictReader(io.StringIO((tmp_path / "analysis" / "cells.csv").read_text())))
    assert [c["n_diverged"] for c in cells] == ["0", "0", "1", "0"]


def test_export_and_read_back_without_torch(tmp_path):
    """Both directions run on a login node without the training stack (tests/test_layers.py's blocker)."""
    import subprocess
    import sys

    from tests.conftest import ROOT, harness_env
    from tests.test_layers import NO_TORCH

    sweep = study_sweep(tmp_path / "sweep")
    for args in ([sweep, "--export", "batch-science", tmp_path / "bs"], [tmp_path / "bs"]):
        proc = subprocess.run([sys.executable, "-c", NO_TORCH, "analyze", *map(str, args), "--no-figures"],
                              capture_output=True, text=True, env=harness_env(), cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert tables(tmp_path / "bs") == tables(sweep)
