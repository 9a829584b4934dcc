"""`harness analyze` over malformed run directories mixed with good ones: each bad one is ONE warning line naming
it, never a traceback; the table is that of the good runs alone; exit 7 with one error line when none remain."""

import json
import shutil

import pytest

import yaml
from harness.cli import main
from tests.conftest import run_harness
from tests.test_analysis import make_run


def good_sweep(root):
    """2 batch sizes x 4 rates x 3 seeds, the optimum inside the grid."""
    for b, best in ((64, 0.5), (128, 1.0)):
        for lr in (0.25, 0.5, 1.0, 2.0):
            for s in range(3):
                make_run(root, "momentum", b, lr, s, 90.0 - 5 * abs(lr - best) + 0.3 * s, loss=0.1 + lr / 10 + 0.01 * s)


def _result(d, **changes):
    path = d / "result.json"
    result = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DROP:
            result.pop(key, None)
        else:
            result[key] = value
    path.write_text(json.dumps(result))


def _config(d, text):
    (d / "config.yaml").write_text(text)


def _replace_with_dir(d, name):
    (d / name).unlink()
    (d / name).mkdir()
    (d / name / "x").write_text("not a file the analysis reads")


DROP = object()
# (id, how the run directory is broken, words of the warning)
CASES = [
    ("result-truncated", lambda d: (d / "result.json").write_text((d / "result.json").read_text()[:25]), "not valid JSON"),
    ("result-empty", lambda d: (d / "result.json").write_text(""), "not valid JSON"),
    ("result-list", lambda d: (d / "result.json").write_text("[1, 2]"), "not a JSON object"),
    ("result-null", lambda d: (d / "result.json").write_text("null"), "not a JSON object"),
    ("result-binary", lambda d: (d / "result.json").write_bytes(b"\xff\xfe\x00\x81garbage"), "cannot be read"),
    ("result-is-a-dir", lambda d: _replace_with_dir(d, "result.json"), "cannot be read"),
    ("status-missing", lambda d: _result(d, status=DROP), "no key status"),
    ("status-number", lambda d: _result(d, status=3), "status is 3 (int)"),
    ("status-null", lambda d: _result(d, status=None), "status is None"),
    ("status-unknown", lambda d: _result(d, status="done"), "status is 'done'"),
    ("status-list", lambda d: _result(d, status=["completed"]), "status is ['completed']"),
    ("test-metric-number", lambda d: _result(d, test_metric=42), "test_metric is 42 (int)"),
    ("test-metric-list", lambda d: _result(d, test_metric=["test_accuracy"]), "test_metric is ['test_accuracy']"),
    ("test-metric-names-missing-key", lambda d: _result(d, test_metric="test_bleu"), "has no key test_bleu"),
    ("test-metric-ambiguous", lambda d: _result(d, test_metric=DROP, test_mse=1.0), "ambiguous"),
    ("test-metric-none-present", lambda d: _result(d, test_metric=DROP, test_accuracy=DROP), "ambiguous"),
    ("metric-string", lambda d: _result(d, test_accuracy="93.1"), "test_accuracy is '93.1' (str)"),
    ("metric-null-completed", lambda d: _result(d, test_accuracy=None), "test_accuracy is None"),
    ("metric-bool", lambda d: _result(d, test_accuracy=True), "test_accuracy is True (bool)"),
    ("metric-object", lambda d: _result(d, test_accuracy={"mean": 90}), "test_accuracy is {'mean': 90} (dict)"),
    ("metric-missing", lambda d: _result(d, test_accuracy=DROP), "has no key test_accuracy"),
    ("train-loss-missing", lambda d: _result(d, train_loss=DROP), "has no key train_loss"),
    ("train-loss-string", lambda d: _result(d, train_loss="low"), "train_loss is 'low' (str)"),
    ("higher-is-better-string", lambda d: _result(d, higher_is_better="yes"), "higher_is_better is 'yes'"),
    ("train-set-loss-string", lambda d: _result(d, train_set_loss="0.1"), "train_set_loss is '0.1' (str)"),
    ("config-missing", lambda d: (d / "config.yaml").unlink(), "result.json without config.yaml"),
    ("config-truncated", lambda d: _config(d, "seed: 0\noptim: {name: momentum, effective_lr: 0.5\nbat"), "not valid YAML"),
    ("config-cut-mid-file", lambda d: _config(d, (d / "config.yaml").read_text().split("optim")[0]), "has no optim."),
    ("config-not-yaml", lambda d: _config(d, "key: [unclosed\n\t- : :"), "not valid YAML"),
    ("config-plain-string", lambda d: _config(d, "hello world"), "holds a str, not a mapping"),
    ("config-empty", lambda d: _config(d, ""), "holds a null, not a mapping"),
    ("config-list", lambda d: _config(d, "- a\n- b\n"), "holds a list, not a mapping"),
    ("config-binary", lambda d: (d / "config.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff"), "config.yaml"),
    ("config-python-tag", lambda d: _config(d, "seed: !!python/object/apply:os.system ['true']"), "not valid YAML"),
    ("config-is-a-dir", lambda d: _replace_with_dir(d, "config.yaml"), "cannot be read"),
    ("config-other-tool", lambda d: _config(d, "model: resnet\nlr: 0.1\ntrainer: {max_epochs: 3}\n"), "no optim.name"),
    ("config-lr-string", lambda d: _config(d, yaml.safe_dump({"optim": {"name": "momentum", "effective_lr": "fast"},
                                                              "batch": {"global_batch_size": 64}})), "effective_lr = 'fast'"),
    ("config-batch-float", lambda d: _config(d, yaml.safe_dump({"optim": {"name": "sgd", "effective_lr": 1.0},
                                                                "batch": {"global_batch_size": 64.5}})), "global_batch_size"),
]


def break_run(root, case_id, how, seed):
    """A run that would have joined a good cell, broken one way, in its own directory `bad-<case>`."""
    d = make_run(root, "momentum", 64, 0.5, 100 + seed, 99.9)
    bad = d.with_name(f"bad-{case_id}")
    d.rename(bad)
    how(bad)
    return bad


def foreign_things(root):
    """What else lives in sweep directories: none of it is a run, none of it may be warned about."""
    (root / "README.md").write_text("# my sweep\n")
    (root / "analysis").mkdir()
    (root / "analysis" / "config.yaml").write_text("{not: [yaml")  # our own output folder: never read
    (root / "analysis" / "table.csv").write_text("a,b\n")
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "config.yaml").write_text(":::")
    (root / "wandb" / "run-1" / "files").mkdir(parents=True)  # another tool's directory, no run files
    (root / "wandb" / "run-1" / "files" / "output.log").write_text("hello\n")
    (root / "notes.txt").write_bytes(b"\x00\x01")


def analyze_in_process(capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        main(["analyze", *map(str, args), "--k", "2", "--n", "3", "--no-figures"])
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


@pytest.fixture(scope="module")
def expected(tmp_path_factory):
    """The tables of the good runs alone."""
    root = tmp_path_factory.mktemp("good")
    good_sweep(root)
    with pytest.raises(SystemExit):
        main(["analyze", str(root), "--k", "2", "--n", "3", "--no-figures"])
    return {name: (root / "analysis" / name).read_text() for name in ("table.csv", "table_by_train_loss.csv", "cells.csv")}


def check(code, err, root, bad, expected):
    """Exit 0, one warning line per (bad directory, reason), no traceback, the good runs' tables."""
    assert code == 0, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == len(bad), err  # one line per bad run, nothing about the foreign files
    for d, reason in bad:
        (line,) = [line for line in lines if f"skipped {d}:" in line]
        assert line.startswith("harness: warning: skipped ") and reason in line, (reason, line)
    for name, text in expected.items():
        assert (root / "analysis" / name).read_text() == text, name


@pytest.mark.parametrize("case_id,how,reason", CASES, ids=[c[0] for c in CASES])
def test_one_bad_run_directory_is_one_warning(tmp_path, capsys, expected, case_id, how, reason):
    good_sweep(tmp_path)
    foreign_things(tmp_path)
    bad = break_run(tmp_path, case_id, how, 0)
    code, out, err = analyze_in_process(capsys, tmp_path)
    check(code, err, tmp_path, [(bad, reason)], expected)
    assert "1 run directories skipped" in out


def test_every_bad_run_at_once(tmp_path, capsys, expected):
    good_sweep(tmp_path)
    foreign_things(tmp_path)
    bad = [(break_run(tmp_path, case_id, how, i), reason) for i, (case_id, how, reason) in enumerate(CASES)]
    code, out, err = analyze_in_process(capsys, tmp_path)
    check(code, err, tmp_path, bad, expected)
    assert f"{len(CASES)} run directories skipped" in out


def test_only_bad_runs_is_one_error_line_exit_7(tmp_path, capsys):
    bad = [break_run(tmp_path, case_id, how, i) for i, (case_id, how, _) in enumerate(CASES[:6])]
    code, out, err = analyze_in_process(capsys, tmp_path)
    assert code == 7 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == len(bad) + 1 and all(line.startswith("harness: warning: skipped ") for line in lines[:-1])
    assert lines[-1] == (f"harness: error: no usable run directories below {tmp_path}: all 6 were skipped (see the "
                         "warnings above); fix or remove them, or run `harness sweep SPEC` to rerun them")


def test_missing_test_metric_is_inferred_from_the_keys(tmp_path, capsys):
    for s, (mse, loss) in enumerate(((3.0, 2.0), (3.2, 2.1), (2.9, 1.9))):
        d = make_run(tmp_path, "momentum", 32, 0.004, s, mse, loss=loss, metric_name="test_mse", higher=True)
        _result(d, test_metric=DROP, higher_is_better=DROP)
    code, out, err = analyze_in_process(capsys, tmp_path)
    assert code == 0 and err == ""
    assert "metric test_mse (lower is better)" in out  # inferred: the MSE's direction, not the file's
    assert "| momentum | 32 | 3 | 2.95 ± 0.07 |" in out  # the best 2 of 3, lowest first


def test_real_cli_warns_once_per_bad_run_and_keeps_going(tmp_path, expected):
    """Through `python -m harness analyze`, as a user runs it: a handful of the cases."""
    good_sweep(tmp_path)
    foreign_things(tmp_path)
    picked = [c for c in CASES if c[0] in ("result-truncated", "test-metric-names-missing-key", "metric-string",
                                            "config-missing", "config-other-tool")]
    bad = [(break_run(tmp_path, case_id, how, i), reason) for i, (case_id, how, reason) in enumerate(picked)]
    proc = run_harness("analyze", tmp_path, "--k", "2", "--n", "3", "--no-figures")
    check(proc.returncode, proc.stderr, tmp_path, bad, expected)
    for d, _ in bad:
        shutil.rmtree(d)
    (tmp_path / "momentum-B64-lr0.5-s0").joinpath("result.json").write_text('{"status": "comp')
    proc = run_harness("analyze", tmp_path, "--k", "2", "--n", "3", "--no-figures")
    assert proc.returncode == 0 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    only_bad = tmp_path / "only_bad"
    break_run(only_bad, "status-number", CASES[7][1], 0)
    proc = run_harness("analyze", only_bad, check=False)
    assert proc.returncode == 7 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("harness: error: no usable run directories below")
