"""Shallue et al.'s batch_science layout ("Measuring the Effects of Data Parallelism on Neural Network Training",
github.com/google-research/google-research, batch_science/README.md "Description of the data" and
data_loader.py): `harness analyze SWEEP_DIR --export batch-science DIR` writes a sweep in it, and `harness analyze
DIR` reads it back (detected when DIR holds study.json files and no run directories).

    DIR/dataset/model/optimizer/batch_size/study.json
    DIR/dataset/model/optimizer/batch_size/trial_id/metadata.json
    DIR/dataset/model/optimizer/batch_size/trial_id/measurements.csv

As their README describes it: a workload is (dataset, model, optimizer), a study is a workload at one batch size,
a trial one training run. study.json: batch_size, dataset, early_stopping, model, optimizer, parameter_configs
(per parameter; ours are grids, so type DISCRETE with its feasible_points), train_steps (the fewest steps a trial
must train to be COMPLETE). metadata.json: parameters, status (COMPLETE; INCOMPLETE: not completed; INFEASIBLE:
diverged), steps (taken), trial_id (an integer, also the trial's directory name, as data_loader.py sorts them),
_internal_study_name, _internal_trial_id. measurements.csv: one row per step with a `step` column, metric columns
named `split/metric` (test/cross_entropy_error, test/classification_error as a fraction).

Where their format is silent, chosen here:
- parameters: learning_rate is torch's lr = eps_eff (1 - m) (their optimizers' learning rate), beside
  effective_learning_rate (eps_eff, what the paper reports), momentum (the m used: 0 for plain SGD), batch_size,
  seed, epoch_budget or step_budget, weight_decay, final_effective_learning_rate (when set), and every other swept
  config key under its dotted name (e.g. model.normalization). An epoch sweep at one B is one study; train_steps is
  then its shortest budget.
- measurements.csv: a row per step at which the run logged anything (training records every log.every_steps,
  evaluations every eval.every_*); empty where a quantity was not measured at that step. Columns: step, epoch,
  train/<x> and test/<x> for metrics.jsonl's train_<x> and test_<x> (train/ values are the logged train-mode
  minibatch values, not an evaluation of the training set as in their data), learning_rate, effective_learning_rate
  and the other logged numbers; plus their names where the quantity is theirs: test/cross_entropy_error (our
  test/loss, classification and language model) and test/classification_error (1 - accuracy / 100).
- metadata.json gains `harness`: the run directory and result.json's fields (test_metric, its value, train_loss,
  train_set_loss, ...), so the tables read back are those of the run directories; study.json gains `harness`:
  the sweep's k and n. Their loaders ignore keys they do not know.
- dataset and model are data.name and model.name ("unknown" when a config has none).
Trials of their own data (no `harness` key) are read from the last measurement: the test metric from test/ columns
(val/ when a study has no test/ columns; accuracy = 100 (1 - classification_error), else perplexity =
exp(cross_entropy_error)), train_set_loss from train/cross_entropy_error; they have no window training loss.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from harness.analysis.checks import BadRun, Outcome, check_config, freeze, is_number, outcome_of
from harness.analysis.history import read_history
from harness.analysis.records import UNFINISHED, RunRecord, Warn, record_of

STATUS = {"completed": "COMPLETE", "diverged": "INFEASIBLE", UNFINISHED: "INCOMPLETE"}
STATUS_BACK = {v: k for k, v in STATUS.items()}
STUDY_KEYS = {"data.name": "dataset", "model.name": "model", "optim.name": "optimizer", "batch.global_batch_size": "batch_size"}
NAMED = {"optim.effective_lr": "effective_learning_rate", "batch.global_batch_size": "batch_size", "seed": "seed",
         "budget.epochs": "epoch_budget", "budget.steps": "step_budget", "optim.weight_decay": "weight_decay",
         "schedule.final_lr": "final_effective_learning_rate"}


def config_of(study: dict, params: dict) -> dict:
    """A trial's config keys from its study (dataset, model, optimizer, B) and its parameters."""
    config = {key: study[name] for key, name in STUDY_KEYS.items()}
    for key, name in NAMED.items():
        if name in params and name != "batch_size":
            config[key] = params[name]
    lr, m = params.get("learning_rate"), params.get("momentum")
    if "optim.effective_lr" not in config and is_number(lr):  # their data: eps_eff = lr / (1 - m)
        config["optim.effective_lr"] = lr / (1.0 - m) if is_number(m) and m < 1 else lr
    if "harness" not in study and is_number(study.get("train_steps")) and study["train_steps"] > 0:
        config.setdefault("budget.steps", study["train_steps"])
    config.update({key: value for key, value in params.items() if "." in key})
    return {key: freeze(value) for key, value in config.items()}


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise BadRun(f"no {path.name}: {what}")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BadRun(f"{path.name} is not readable JSON ({' '.join(str(e).split())}): {what}") from None


def _read_study(study_dir: Path) -> dict:
    fix = "restore it from the export, or move the study directory out"
    study = _read_json(study_dir / "study.json", fix)
    if not isinstance(study, dict):
        raise BadRun(f"study.json holds a {type(study).__name__}, not a JSON object; {fix}")
    for key, types in (("dataset", str), ("model", str), ("optimizer", str), ("batch_size", int)):
        if not isinstance(study.get(key), types) or isinstance(study.get(key), bool):
            raise BadRun(f"study.json has no valid {key} ({study.get(key)!r}); {fix}")
    return study


def _load_trial(trial_dir: Path, study: dict) -> RunRecord:
    fix = "restore the trial from the export, or move its directory out"
    meta = _read_json(trial_dir / "metadata.json", fix)
    if not isinstance(meta, dict) or meta.get("status") not in STATUS_BACK or not isinstance(meta.get("parameters"), dict):
        raise BadRun(f"metadata.json needs status COMPLETE, INCOMPLETE or INFEASIBLE and a parameters object; {fix}")
    config = check_config(config_of(study, meta["parameters"]), "metadata.json", fix)
    status = STATUS_BACK[meta["status"]]
    harness = meta.get("harness")
    measurements = trial_dir / "measurements.csv"
    if status == UNFINISHED:
        outcome = Outcome(UNFINISHED)
    elif isinstance(harness, dict) and isinstance(harness.get("result"), dict):
        outcome = outcome_of({**harness["result"], "status": status}, "metadata.json harness.result")
    else:
        outcome = outcome_of(_their_result(read_history(measurements)[0], status), "measurements.csv")
    return record_of(trial_dir, config, outcome, measurements)


def _their_result(records: list[dict], status: str) -> dict:
    """A result record from a trial of their data: the last measured value of each quantity (an INFEASIBLE
    trial's values are not results: it diverged, the worst value of its cell)."""
    last: dict = {}
    for r in records:
        last.update({k: v for k, v in r.items() if is_number(v)})
    keys = {k for r in records for k in r}
    name = "test_accuracy" if "test_accuracy" in keys or "test_loss" not in keys else "test_perplexity"
    result = {"status": status, "test_metric": name, name: None, "train_loss": None}
    if status == "diverged":
        return result
    result["train_set_loss"] = last.get("train_cross_entropy_error")
    if "train_classification_error" in last:
        result["train_set_accuracy"] = 100.0 * (1.0 - last["train_classification_error"])
    if name == "test_accuracy":
        result["test_accuracy"] = last.get("test_accuracy")
    else:
        result.update(test_perplexity=math.exp(min(last["test_loss"], 700.0)), higher_is_better=False)
    return result


def load_studies(root: Path, study_dirs: list[Path], warn: Warn) -> tuple[list[RunRecord], Optional[tuple[int, int]]]:
    """Every trial of every study below `root`; one warning per study or trial that cannot be read."""
    records, select = [], None
    for study_dir in study_dirs:
        try:
            study = _read_study(study_dir)
        except BadRun as e:
            warn(f"skipped {study_dir}: {e}")
            continue
        chosen = (study.get("harness") or {}).get("select") if isinstance(study.get("harness"), dict) else None
        if select is None and isinstance(chosen, dict) and all(is_number(chosen.get(x)) for x in ("k", "n")):
            select = (int(chosen["k"]), int(chosen["n"]))
        trials = sorted((d for d in study_dir.iterdir() if d.is_dir() and not d.name.startswith(".")),
                        key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))
        for trial_dir in trials:
            if not any((trial_dir / f).exists() for f in ("metadata.json", "measurements.csv")):
                continue  # not a trial (another tool's directory)
            try:
                records.append(_load_trial(trial_dir, study))
            except BadRun as e:
                warn(f"skipped {trial_dir}: {e}")
    return records, select
