"""A sweep directory and what state its runs are in:

    SWEEP_DIR/sweep.yaml            the spec as run (base config inlined): analysis reads select.k/n from it
    SWEEP_DIR/<run name>/           one ordinary run directory per run (config.yaml, result.json, tb/, ...)
    SWEEP_DIR/events...hparams      the TensorBoard HParams experiment (harness/sweep/tensorboard_hparams.py)
    SWEEP_DIR/.sweep/runs.json      every run of the current spec: id, name, grid point, resolved config
    SWEEP_DIR/.sweep/locks/         one lock per run in progress (harness/sweep/locks.py)
    SWEEP_DIR/.sweep/history.jsonl  one line per run executed: who ran it, when, and how it ended
    SWEEP_DIR/.sweep/slurm/         task files, submitted job arrays and their logs

A run is finished when its result.json says completed or diverged (harness.core.status: a diverged run is a
result, the worst value of its cell, never retried). Anything else (never started, interrupted, failed) is
missing, and a resubmission runs exactly the missing runs that no live executor holds and no queued SLURM array
task will run: finished run directories are not touched.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml
from harness.core import configlib
from harness.core import status as run_status
from harness.core.errors import ConfigError
from harness.core.io import atomic_write_json, atomic_write_text, read_json
from harness.core.keys import get_dotted
from harness.sweep.locks import STALE_AFTER_SECONDS, RunLocks, is_stale, read_lock
from harness.sweep.spec import Run, Sweep

STATE = ".sweep"
# Hyper-parameters every run shows in TensorBoard's HParams dashboard, besides the swept keys.
STANDARD_HPARAMS = ("optim.name", "batch.global_batch_size", "optim.effective_lr", "schedule.final_lr", "seed",
                    "budget.steps", "budget.epochs")


def state_dir(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / STATE


def locks_for(sweep_dir: Path) -> RunLocks:
    return RunLocks(state_dir(sweep_dir) / "locks")


def result_of(run_dir: Path) -> Optional[dict]:
    try:
        return read_json(Path(run_dir) / "result.json")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_finished(run_dir: Path) -> bool:
    return run_status.is_finished(result_of(run_dir))


def hparams_of(run: Run, keys: list[str]) -> dict:
    out = {}
    for key in dict.fromkeys([*STANDARD_HPARAMS, *keys]):
        try:
            out[key] = get_dotted(run.config, key)
        except ConfigError:
            pass
    return out


def entry(run: Run, keys: list[str]) -> dict:
    """What a task needs to train a run, without the spec: written into runs.json and SLURM task files."""
    return {"id": run.id, "name": run.name, "point": run.point, "config": run.config, "hparams": hparams_of(run, keys)}


# ---------------------------------------------------------------------------------------------- the sweep directory


def prepare(sweep: Sweep, sweep_dir: Path) -> list[dict]:
    """Create or refresh the sweep directory for this spec; return the run entries."""
    sweep_dir = Path(sweep_dir)
    unchecked = [r for r in sweep.runs if not r.model_checked]
    if unchecked:
        raise ConfigError(f"model section of sweep {sweep.name} cannot be loaded by this build: {unchecked[0].model_note}")
    state_dir(sweep_dir).mkdir(parents=True, exist_ok=True)
    keys = sweep.axis_keys
    entries = [entry(r, keys) for r in sweep.runs]
    spec = configlib.to_dict(sweep.spec)
    spec.update(name=sweep.name, base=sweep.base, overrides={})
    atomic_write_text(sweep_dir / "sweep.yaml", "# written by `harness sweep`: the spec as run, base config inlined\n"
                      + yaml.safe_dump(spec, sort_keys=False))
    atomic_write_json(state_dir(sweep_dir) / "runs.json", {"name": sweep.name, "runs": entries})
    if sweep.runs[0].resolved().log.tensorboard:
        from harness.sweep import tensorboard_hparams

        domains = {k: [e["hparams"].get(k) for e in entries] for k in entries[0]["hparams"]}
        domains = {k: v for k, v in domains.items() if any(x is not None for x in v)}
        tensorboard_hparams.write_experiment(sweep_dir, domains, _test_metric(sweep.runs[0]), sweep.spec.description)
    return entries


def _test_metric(run: Run) -> str:
    """The metric the trainer will report, for the HParams experiment (before any run finished)."""
    from data_pipelines import describe as describe_data
    from harness.train import objectives

    cfg = run.resolved()
    spec, _ = describe_data(cfg.data.name, cfg.data.path)
    task = cfg.model.task(spec.task) if hasattr(cfg.model, "task") else spec.task
    try:
        return objectives.for_task(task).metric
    except KeyError:
        return "test_metric"


@dataclass
class Status:
    finished: list[dict] = field(default_factory=list)
    running: list[tuple[dict, dict]] = field(default_factory=list)  # (entry, lock holder)
    queued: list[tuple[dict, str]] = field(default_factory=list)  # (entry, SLURM array task waiting for it)
    missing: list[dict] = field(default_factory=list)


def status(entries: list[dict], sweep_dir: Path) -> Status:
    """Finished, running (a live lock), queued (in a SLURM array task not yet ended) or missing, per run."""
    out = Status()
    locks = state_dir(sweep_dir) / "locks"
    queued = queued_runs(sweep_dir)
    for e in entries:
        lock = locks / f"{e['id']}.lock"
        if is_finished(Path(sweep_dir) / e["name"]):
            out.finished.append(e)
            info = read_lock(lock)
            if info is not None and is_stale(lock, info, STALE_AFTER_SECONDS):
                lock.unlink(missing_ok=True)  # its holder died between writing result.json and releasing
            continue
        info = read_lock(lock)
        if info is not None and not is_stale(lock, info, STALE_AFTER_SECONDS):
            out.running.append((e, info))
        elif e["id"] in queued:
            out.queued.append((e, queued[e["id"]]))
        else:
            out.missing.append(e)
    return out


def queued_runs(sweep_dir: Path) -> dict[str, str]:
    """Runs in array tasks of earlier submissions that SLURM still lists (pending or running): a resubmission
    leaves them to those tasks instead of queueing them twice. {} without squeue or submissions."""
    record = state_dir(sweep_dir) / "slurm" / "submitted.jsonl"
    if not record.exists():
        return {}
    jobs = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    try:
        proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(j["job"] for j in jobs)],
                              capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return {}
    if proc.returncode != 0:  # e.g. every job id has left squeue's memory: nothing is queued
        return {}
    alive = set(proc.stdout.split())
    out = {}
    for j in jobs:
        try:
            tasks = read_json(j["task_file"])["tasks"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            continue
        for index, task in enumerate(tasks):
            if f"{j['job']}_{index}" in alive:
                for e in task:
                    out[e["id"]] = f"{j['job']}_{index}"
    return out


def record_submission(sweep_dir: Path, job: str, task_file: Path) -> None:
    with open(state_dir(sweep_dir) / "slurm" / "submitted.jsonl", "a") as f:
        f.write(json.dumps({"job": job, "task_file": str(task_file.resolve()), "time": time.time()}) + "\n")
