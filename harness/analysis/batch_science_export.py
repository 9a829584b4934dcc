"""`harness analyze SWEEP_DIR --export batch-science DIR`: a sweep's runs in Shallue et al.'s batch_science
layout (described, with what is chosen where their format is silent, in batch_science.py, which reads it back)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from harness.analysis.batch_science import NAMED, STATUS, STUDY_KEYS
from harness.analysis.checks import is_number
from harness.analysis.history import PLAIN_COLUMNS, read_history, write_csv_rows
from harness.analysis.records import STUDY_FILE, UNFINISHED, RunRecord, Warn, discover
from harness.core.errors import SweepError
from harness.core.io import atomic_write_text, make_temp_dir
from harness.recipe.optim import momentum_of, torch_lr


def _json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _thaw(v):
    return [_thaw(x) for x in v] if isinstance(v, tuple) else v


def _order(v) -> tuple:
    return (0, v, "") if is_number(v) else (1, 0, str(v))


def _path_part(v) -> str:
    return str(v if v is not None else "unknown").replace("/", "_").replace(" ", "_") or "unknown"


def parameters_of(config: dict, extras: list[str]) -> dict:
    """A run's metadata.json parameters: the named hyper-parameters, torch's lr and m, and the other swept keys."""
    params = {name: _thaw(config[key]) for key, name in NAMED.items() if config.get(key) is not None}
    raw_m = config.get("optim.momentum")
    m = momentum_of(config["optim.name"], raw_m) if raw_m is not None or config["optim.name"] != "momentum" else None
    params["momentum"] = m
    params["learning_rate"] = torch_lr(config["optim.effective_lr"], m) if m is not None else None
    params.update({key: _thaw(config[key]) for key in extras if config.get(key) is not None})
    return params


def measurement_rows(records: list[dict], metric: Optional[str]) -> tuple[list[dict], list[str]]:
    """metrics.jsonl records (merged per step) as measurements.csv rows and columns."""
    rows = []
    for r in records:
        row = {}
        for key, value in r.items():
            if key.startswith(("train_", "test_")):
                row[key.replace("_", "/", 1)] = value
            else:
                row[PLAIN_COLUMNS.get(key, key)] = value
        if is_number(r.get("test_loss")) and metric in ("test_accuracy", "test_perplexity"):
            row["test/cross_entropy_error"] = r["test_loss"]
        if is_number(r.get("test_accuracy")):
            row["test/classification_error"] = 1.0 - r["test_accuracy"] / 100.0
        rows.append(row)
    names = {c for row in rows for c in row} - {"step", "epoch"}
    order = lambda c: (0 if c.startswith("train/") else 1 if c.startswith("test/") else 2, c)  # noqa: E731
    return rows, ["step", "epoch", *sorted(names, key=order)]


def trial_files(r: RunRecord, sweep_dir: Path, trial_id: int, study_name: str, extras: list[str],
                warn: Warn) -> tuple[dict, str]:
    """metadata.json (as a dict) and measurements.csv (text) of one run."""
    records, bad = read_history(r.history)
    if bad:
        warn(f"{r.history}: {bad} unreadable lines left out of the export (cut by a kill mid-write?)")
    o = r.outcome
    rows, columns = measurement_rows(records, o.metric_name if o else None)
    steps = o.steps if o and o.steps is not None else (records[-1]["step"] if records else 0)
    result = {}
    if r.status != UNFINISHED:
        result = {"test_metric": o.metric_name, "higher_is_better": o.higher_is_better, o.metric_name: o.metric,
                  **{k: getattr(o, k) for k in ("train_loss", "train_set_loss", "train_set_accuracy", "steps",
                                                 "total_steps", "epochs") if getattr(o, k) is not None}}
    try:
        run = str(r.path.relative_to(sweep_dir))
    except ValueError:
        run = str(r.path)
    meta = {"_internal_study_name": study_name, "_internal_trial_id": trial_id, "trial_id": trial_id,
            "parameters": parameters_of(r.config, extras), "status": STATUS[r.status], "steps": int(steps),
            "harness": {"run": run, "result": result}}
    return meta, write_csv_rows(rows, columns)


def study_files(a, sweep_dir: Path, warn: Warn) -> dict[str, str]:
    """Every file of the export, by its path relative to the export directory."""
    from harness.analysis.select import FIXED_GROUP_KEYS

    extras = [k for k in a.group_keys if k not in NAMED and k not in STUDY_KEYS and k not in FIXED_GROUP_KEYS]
    studies: dict[tuple, list[RunRecord]] = {}
    for r in sorted(a.records, key=lambda r: str(r.path)):
        studies.setdefault(tuple(r.config.get(key) for key in STUDY_KEYS), []).append(r)
    files = {}
    for (dataset, model, optimizer, b), runs in sorted(studies.items(), key=lambda kv: tuple(map(str, kv[0]))):
        base = f"{_path_part(dataset)}/{_path_part(model)}/{_path_part(optimizer)}/{b}"
        name = f"{sweep_dir.name}-bs{b}"
        metas = []
        for trial_id, r in enumerate(runs, start=1):
            meta, measurements = trial_files(r, sweep_dir, trial_id, name, extras, warn)
            files[f"{base}/{trial_id}/measurements.csv"] = measurements
            metas.append(meta)
        for meta in metas:
            files[f"{base}/{meta['trial_id']}/metadata.json"] = _json(meta)
        files[f"{base}/study.json"] = _json(study_json(dataset, model, optimizer, b, runs, metas, a, sweep_dir.name))
    return files


def study_json(dataset, model, optimizer, b, runs: list[RunRecord], metas: list[dict], a, sweep: str) -> dict:
    configs: dict[str, set] = {}
    for meta in metas:
        for key, value in meta["parameters"].items():
            if value is not None:
                configs.setdefault(key, set()).add(json.dumps(value))
    budgets = [r.outcome.total_steps for r in runs if r.outcome and r.outcome.total_steps is not None]
    budgets = budgets or [m["parameters"]["step_budget"] for m in metas if "step_budget" in m["parameters"]]
    budgets = budgets or [m["steps"] for m in metas if m["status"] == "COMPLETE"]
    return {"batch_size": b, "dataset": _path_part(dataset), "model": _path_part(model), "optimizer": optimizer,
            "early_stopping": False, "train_steps": int(min(budgets)) if budgets else 0,
            "parameter_configs": {key: {"type": "DISCRETE", "feasible_points": sorted(map(json.loads, values), key=_order)}
                                  for key, values in sorted(configs.items())},
            "harness": {"sweep": sweep, "select": {"k": a.k, "n": a.n}, "test_metric": a.metric,
                        "higher_is_better": a.higher_is_better}}


def export(a, sweep_dir: Path, dest: Path, echo=None) -> dict[str, int]:
    """Write analysis `a`'s runs into `dest` in the layout, atomically: the whole tree is written beside `dest`
    and renamed into place, so `dest` is either the old export or the new one. Counts trials per status."""
    dest, warn = Path(dest), Warn(echo)
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not _is_export(dest))):
        raise SweepError(f"--export: {dest} exists and is not a batch-science export; choose a new directory")
    files = study_files(a, Path(sweep_dir), warn)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(dest.parent, f".{dest.name}.tmp-")  # not mkdtemp: its 0700 would make the export private
    try:
        for rel, text in files.items():
            atomic_write_text(tmp / rel, text)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            tmp.rename(dest)
            _keep_extras(old, dest, files, warn)
            shutil.rmtree(old)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts = {s: 0 for s in STATUS.values()}
    for r in a.records:
        counts[STATUS[r.status]] += 1
    counts["studies"] = sum(rel.endswith("/study.json") for rel in files)
    return counts


def _keep_extras(old: Path, dest: Path, files: dict[str, str], warn: Warn) -> None:
    """What the earlier export held besides its studies (the analysis/ that `harness analyze DIR` wrote there,
    a user's notes) moves into the new export instead of vanishing with the old tree."""
    written = {rel.split("/")[0] for rel in files}
    for entry in sorted(old.iterdir()):
        if entry.name in written or (entry.is_dir() and next(entry.rglob(STUDY_FILE), None) is not None):
            continue
        entry.rename(dest / entry.name)
        warn(f"--export: kept {dest / entry.name} (not part of the export) from the earlier export")


def _is_export(path: Path) -> bool:
    runs, studies = discover(path)
    return bool(studies) and not runs
