"""What a new user reads: each message names the problem and the fix, and says it before doing any work.
In-process through harness.cli.main (the CLI process itself is not what is tested here)."""

from __future__ import annotations

import pytest

from data_pipelines import describe
from data_pipelines.convert import convert
from data_pipelines.shards import read_manifest
from harness.cli import main
from harness.core.errors import ConfigError, DataError, PlanError
from harness.recipe.batch_plan import make_batch_plan
from harness.train.record import summary
from tests.conftest import ROOT
from tests.test_analysis import cell
from tests.test_analysis_batch_science import study_sweep

CONFIG = str(ROOT / "yaml" / "digits_mlp.yaml")


def run(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main([*map(str, args)])
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness: error: "), err
    return lines[0]


def test_plan_says_why_a_micro_batch_cannot_hold_ghost_groups():
    with pytest.raises(PlanError) as e:
        make_batch_plan(1536, 4, 48, ghost_batch_size=64)
    assert "?" not in str(e.value) and "micro-batch 48 must be a multiple of the ghost batch size 64, or a divisor of it" in str(e.value)
    with pytest.raises(PlanError, match="a ghost group of 64 spans 4 ranks of micro-batch 16"):
        make_batch_plan(256, 2, 16, ghost_batch_size=64)


def test_a_diverged_run_says_so_once_without_none():
    result = {"status": "diverged", "steps": 6, "total_steps": 420, "diverged_at_step": 6, "test_metric": "test_accuracy",
              "test_accuracy": None, "train_loss": None, "examples_per_second": 1234.0}
    line = summary(result)
    assert "None" not in line and line.count("diverged") == 1
    assert line.startswith("done: diverged at step 6 of 420 (training loss non-finite or above divergence.max_loss)")
    done = {**result, "status": "completed", "steps": 420, "diverged_at_step": None, "test_accuracy": 95.5, "train_loss": 0.1424}
    assert summary(done) == "done: completed after 420 steps; test_accuracy 95.5; final train loss 0.1424; 1234 examples/s"


@pytest.mark.parametrize("order", ["config first", "set first"])
def test_set_before_or_after_the_config(capsys, digits_shards, order):
    sets = ["--set", "batch.global_batch_size=32", f"data.path={digits_shards}"]
    args = ["plan", CONFIG, *sets] if order == "config first" else ["plan", *sets, CONFIG]
    code, out, _ = run(capsys, *args)
    assert code == 0 and "plan:       32 = 32 micro" in out


def test_set_without_a_config_and_with_two(capsys):
    code, _, err = run(capsys, "plan", "--set", "batch.global_batch_size=32")
    assert code == 2 and "no config file given; usage: harness plan CONFIG [--set KEY=VALUE ...]" in one_error(err)
    code, _, err = run(capsys, "plan", CONFIG, "--set", "seed=1", CONFIG)
    assert code == 2 and "two config files" in one_error(err)


def test_a_directory_as_config_is_named_a_directory(capsys):
    code, _, err = run(capsys, "plan", ROOT / "yaml")
    assert code == 2 and "is a directory; pass the path of a YAML file in it" in one_error(err)


def test_a_missing_budget_says_how_to_set_one(capsys):
    code, _, err = run(capsys, "plan", CONFIG, "--set", "budget.epochs=null")
    line = one_error(err)
    assert code == 2 and "neither is set" in line and "--set budget.epochs=20" in line and "switch" not in line


def test_a_relative_data_path_says_relative_to_what(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=f"data path no/such/dir \\(relative to the current directory {tmp_path}\\) does not exist"):
        read_manifest("no/such/dir", "digits")


def test_plan_on_another_datasets_shards_says_whose_they_are(digits_shards):
    spec, source = describe("cifar10", str(digits_shards))
    assert spec.num_train == 50000 and "not found" not in source
    assert "holds 'digits' shards but data.name is 'cifar10'" in source


def test_convert_digits_refuses_a_source_it_would_ignore(tmp_path):
    with pytest.raises(DataError, match=r"digits is embedded in scikit-learn, not read: pass '-' as SRC"):
        convert("digits", str(tmp_path / "digits.tar"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_analyze_names_a_file_a_file(capsys):
    code, _, err = run(capsys, "analyze", ROOT / "README.md")
    assert code == 7 and "is a file, not a sweep directory" in one_error(err)


def test_analyze_checks_the_reference_before_printing_the_analysis(tmp_path, capsys):
    cell(tmp_path, "momentum", 64, 1.0, [90.0, 91.0])
    code, out, err = run(capsys, "analyze", tmp_path, "--no-figures", "--reference", "paper:table9")
    assert code == 7 and out == "" and "available: paper:table1" in one_error(err)
    assert not (tmp_path / "analysis").exists()


def test_export_counts_one_study_and_keeps_an_analysis_folder_on_re_export(tmp_path, capsys):
    for lr in (0.5, 1.0):
        cell(tmp_path / "sweep", "momentum", 64, lr, [90.0, 91.0])
    dest = tmp_path / "export"
    code, out, _ = run(capsys, "analyze", tmp_path / "sweep", "--no-figures", "--export", "batch-science", dest)
    assert code == 0 and "in 1 study to" in out
    code, _, _ = run(capsys, "analyze", dest, "--no-figures")  # analyze the export: writes dest/analysis
    assert code == 0 and (dest / "analysis" / "table.md").is_file()
    (dest / "NOTES.txt").write_text("mine")
    code, _, err = run(capsys, "analyze", tmp_path / "sweep", "--no-figures", "--export", "batch-science", dest)
    assert code == 0 and (dest / "analysis" / "table.md").is_file() and (dest / "NOTES.txt").read_text() == "mine"
    assert f"kept {dest / 'analysis'} (not part of the export)" in err


def test_export_of_several_studies_is_plural(tmp_path, capsys):
    code, out, _ = run(capsys, "analyze", study_sweep(tmp_path / "sweep"), "--no-figures", "--export", "batch-science",
                       tmp_path / "export")
    assert code == 0 and "in 4 studies to" in out


def _parsers(parser, name="harness"):
    import argparse

    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                if sub_name != "sweep-task":  # internal: run by slurm/sweep_array.sh
                    yield from _parsers(sub, f"{name} {sub_name}")


def test_every_flag_and_argument_has_help_and_sweep_task_is_hidden(capsys):
    import argparse

    from harness.cli import build_parser
    from launch.cli import build_parser as build_launch_parser

    parsers = [*_parsers(build_parser()), ("python -m launch", build_launch_parser())]
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in parsers for a in p._actions
               if not isinstance(a, argparse._SubParsersAction)  # the command list: each command has its help
               and (a.help is None or (a.help != argparse.SUPPRESS and len(a.help) < 10))]
    assert not missing, missing
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "SUPPRESS" not in out and "sweep-task" not in out and "train" in out


def test_probe_takes_set_before_or_after_the_config(capsys, tmp_path):
    """`probe --set k=v CONFIG` reads CONFIG as the config (argparse's nargs='+' used to swallow it)."""
    missing = tmp_path / "no-data"
    code, _, err = run(capsys, "probe", "--set", "seed=1", f"data.path={missing}", CONFIG, "--steps", "0")
    line = one_error(err)
    assert code == 4 and f"data path {missing} does not exist" in line, line  # the config was read: its data checked
    code, _, err = run(capsys, "probe", "--branch", "runs/x", "--set", "seed=1", CONFIG)
    assert code == 2 and "not a CONFIG, --set or --batch-sizes" in one_error(err)
