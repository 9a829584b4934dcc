"""Tasks: the missing runs of a sweep grouped for one process each, and running one task: lock each run,
train it (a pack of runs as one batched model, harness/train/packed.py; or runs one after another in this
process, without start-up per run; or each through `python -m launch` when runs need several GPUs or nodes),
record how it ended, release the lock."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml
from harness.core.errors import Interrupted, RunDirInUse
from harness.core.io import atomic_write_text
from harness.core.paths import REPO_ROOT
from harness.core.status import FINISHED, INTERRUPTED
from harness.sweep.cost import run_steps
from harness.sweep.locks import RunLocks, describe
from harness.sweep.state import is_finished, locks_for, result_of, state_dir


def cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()


def group_tasks(entries: list[dict], pack: Optional[bool], max_pack, runs_per_task: int,
                cuda_available: Optional[bool] = None) -> list[list[dict]]:
    """Group runs into tasks: packs of runs that may train as one model (at most `max_pack`, a number or a
    function of the model family), else `runs_per_task` per task. `pack`: True packs every packable run, False
    none, None where packing is faster (packed.pack_choice: by family and device; `cuda_available`, default this
    machine's, resolves device auto). Largest tasks first, so a pool of workers ends together."""
    from harness.train.packed import pack_choice, pack_key

    cuda = cuda_here() if cuda_available is None else cuda_available
    tasks, packs = [], {}
    singles = []
    for e in entries:
        key = pack_key(e["config"]) if pack_choice(e["config"], pack, cuda)[0] else None
        if key is None:
            singles.append(e)
        else:
            packs.setdefault(key, []).append(e)
    for group in packs.values():
        size = max_pack(group[0]["config"]["model"]["name"]) if callable(max_pack) else max_pack
        tasks += [group[i:i + size] for i in range(0, len(group), size)]
    tasks += [singles[i:i + runs_per_task] for i in range(0, len(singles), runs_per_task)]
    return sorted(tasks, key=_task_cost, reverse=True)


def describe_packing(entries: list[dict], pack: Optional[bool], cuda_available: Optional[bool] = None) -> str:
    """One line for the start of a sweep: for each model family and device of the runs, whether they train in packs
    and why (packed.pack_choice)."""
    from harness.train.packed import pack_choice, run_device

    cuda = cuda_here() if cuda_available is None else cuda_available
    seen: dict = {}
    for e in entries:
        where = (e["config"]["model"]["name"], run_device(e["config"], cuda))
        if where not in seen:
            seen[where] = pack_choice(e["config"], pack, cuda)
    return "packing: " + "; ".join(f"{model} on {device}: {'packs' if yes else 'one by one'} ({why})"
                                   for (model, device), (yes, why) in seen.items())


def _task_cost(task: list[dict]) -> float:
    """Relative cost: examples processed, plus a per-step overhead that dominates tiny batches."""
    try:
        steps, _ = run_steps(task[0]["config"])
    except Exception:  # noqa: BLE001 - ordering only
        return 0.0
    b = task[0]["config"]["batch"]["global_batch_size"]
    return steps * (b * len(task) + 256 * len(task) ** 0.5)


@dataclass
class Outcome:
    id: str
    name: str
    status: str  # completed | diverged | failed | interrupted | finished-before | locked
    detail: str = ""
    metric: Optional[float] = None
    metric_name: str = ""


class TaskSignals:
    """SIGUSR1/SIGTERM in an array task: stop after the run in progress. A run trained in this process sees
    the signal itself (harness/train/signals.py); a run started through the launch entry gets it forwarded."""

    def __init__(self):
        self.requested = False
        self.child: Optional[subprocess.Popen] = None

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame) -> None:
        from harness.train.signals import request_stop

        self.requested = True
        request_stop(signal.Signals(signum).name)  # a run starting in this process stops at its first step
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)


def execute_task(sweep_dir: Path, entries: list[dict], pack: Optional[bool] = None,
                 signals: Optional[TaskSignals] = None, launch: Optional[dict] = None) -> list[Outcome]:
    """Run one task's runs: lock each, train (as a pack where `pack` allows, as group_tasks), release. Runs train
    in THIS process, unless `launch` is given ({"nproc_per_node": P or None}): then each starts through
    `python -m launch` (several processes, several nodes inside a SLURM job) and this process waits for it."""
    from harness.train.packed import pack_choice, pack_key

    sweep_dir = Path(sweep_dir)
    stop = (lambda: signals.requested) if signals is not None else None
    locks = locks_for(sweep_dir)
    outcomes, mine = [], []
    for e in entries:
        if is_finished(sweep_dir / e["name"]):
            outcomes.append(Outcome(e["id"], e["name"], "finished-before"))
            continue
        ok, holder = locks.acquire(e["id"])
        if ok and is_finished(sweep_dir / e["name"]):  # finished between our check and the lock
            locks.release(e["id"])
            outcomes.append(Outcome(e["id"], e["name"], "finished-before"))
        elif ok:
            mine.append(e)
        else:
            outcomes.append(Outcome(e["id"], e["name"], "locked", describe(holder)))
    try:
        packable = launch is None and len(mine) > 1 and pack_choice(mine[0]["config"], pack, cuda_here())[0] \
            and len({pack_key(e["config"]) for e in mine} - {None}) == 1 and pack_key(mine[0]["config"]) is not None
        if launch is not None:
            for e in mine:
                if stop is not None and stop():
                    break
                outcomes.append(_run_launched(sweep_dir, e, locks, launch, signals))
                if outcomes[-1].status == INTERRUPTED:
                    break
        elif packable:
            outcomes += _run_pack(sweep_dir, mine, locks, stop)
        else:
            for e in mine:
                if stop is not None and stop():
                    break
                outcomes.append(_run_one(sweep_dir, e, locks))
                if outcomes[-1].status == INTERRUPTED:
                    break
    finally:
        locks.release_all()
    return outcomes


def _record(sweep_dir: Path, e: dict, status: str, started: float, **extra) -> None:
    line = json.dumps({"id": e["id"], "name": e["name"], "status": status, "host": socket.gethostname(),
                       "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"), "started": started,
                       "ended": time.time(), **extra})
    with open(state_dir(sweep_dir) / "history.jsonl", "a") as f:  # O_APPEND: one short line per write
        f.write(line + "\n")


def _done(sweep_dir: Path, e: dict, result: dict, started: float, locks: RunLocks, **extra) -> Outcome:
    run_dir = sweep_dir / e["name"]
    if result.get("status") in FINISHED and (run_dir / "tb").is_dir():
        from harness.sweep import tensorboard_hparams

        tensorboard_hparams.write_session(run_dir, e["hparams"], result)
    (run_dir / "error.txt").unlink(missing_ok=True)
    _record(sweep_dir, e, result.get("status", "?"), started, **extra)
    locks.release(e["id"])
    metric = result.get("test_metric", "")
    return Outcome(e["id"], e["name"], result.get("status", "?"), "", result.get(metric), metric)


def _failed(sweep_dir: Path, e: dict, started: float, locks: RunLocks, error: BaseException) -> Outcome:
    run_dir = sweep_dir / e["name"]
    text = "".join(traceback.format_exception(error))
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "error.txt", text)
    one_line = f"{type(error).__name__}: {error}".splitlines()[0]
    _record(sweep_dir, e, "failed", started, error=one_line)
    locks.release(e["id"])
    return Outcome(e["id"], e["name"], "failed", one_line)


def _run_one(sweep_dir: Path, e: dict, locks: RunLocks) -> Outcome:
    from harness.train.config import from_dict
    from harness.train.trainer import train

    started = time.time()
    run_dir = sweep_dir / e["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        cfg = from_dict(_quiet(e["config"]))
        with open(run_dir / "train.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            result = train(cfg, run_dir)
    except KeyboardInterrupt:
        raise
    except Interrupted:  # Ctrl-C in a task run from a terminal (`harness sweep-task`): checkpointed; stop the task
        _record(sweep_dir, e, INTERRUPTED, started)
        locks.release(e["id"])
        raise
    except RunDirInUse as error:  # a `harness train` outside the sweep holds the run dir: as if locked
        locks.release(e["id"])
        return Outcome(e["id"], e["name"], "locked", str(error))
    except Exception as error:  # noqa: BLE001 - a failed run is recorded and the task goes on
        return _failed(sweep_dir, e, started, locks, error)
    if result.get("status") not in FINISHED:
        _record(sweep_dir, e, result.get("status", "?"), started)
        locks.release(e["id"])
        return Outcome(e["id"], e["name"], result.get("status", INTERRUPTED))
    return _done(sweep_dir, e, result, started, locks)


class LaunchedRunError(Exception):
    """A run started through the launch entry ended without a result."""


def _run_launched(sweep_dir: Path, e: dict, locks: RunLocks, launch: dict,
                  signals: Optional[TaskSignals]) -> Outcome:
    """One run through the launch entry: srun + torchrun across this SLURM job's nodes (or torchrun here)."""
    started = time.time()
    run_dir = (sweep_dir / e["name"]).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = state_dir(sweep_dir).resolve() / "configs" / f"{e['name']}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config, yaml.safe_dump(_quiet(e["config"]), sort_keys=False))
    cmd = [sys.executable, "-m", "launch", "--python", sys.executable]
    if launch.get("nproc_per_node"):
        cmd += ["--nproc-per-node", str(launch["nproc_per_node"])]
    job = os.environ.get("SLURM_JOB_ID")
    # One rendezvous per run: runs of a task follow each other on the same port (fixed by the job id).
    cmd += ["--rdzv-id", f"{job or 'local'}-{e['id']}", str(config), "--run-dir", str(run_dir)]
    env = dict(os.environ)
    root = str(REPO_ROOT)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    log_path = run_dir / "train.log"
    try:
        with open(log_path, "a") as log:
            log.write(f"sweep: {' '.join(cmd)}\n")
            log.flush()
            child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            if signals is not None:
                signals.child = child
            try:
                code = child.wait()
            finally:
                if signals is not None:
                    signals.child = None
    except OSError as error:
        return _failed(sweep_dir, e, started, locks, error)
    result = result_of(run_dir)
    if result is not None and result.get("status") in FINISHED:
        return _done(sweep_dir, e, result, started, locks, exit_code=code)
    if code == 0 or (signals is not None and signals.requested):
        # Stopped at a step boundary (checkpoint saved; an interrupted run writes no result.json), or killed
        # while stopping: the resubmitted sweep resumes it.
        _record(sweep_dir, e, INTERRUPTED, started, exit_code=code)
        locks.release(e["id"])
        return Outcome(e["id"], e["name"], INTERRUPTED)
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    why = (errors or lines or ["no output"])[-1].strip()
    return _failed(sweep_dir, e, started, locks, LaunchedRunError(f"python -m launch exited {code}: {why} "
                                                                   f"(whole log: {log_path})"))


def _run_pack(sweep_dir: Path, mine: list[dict], locks: RunLocks, stop) -> list[Outcome]:
    from harness.train.config import from_dict
    from harness.train.packed import NotPackable, train_pack

    started = time.time()
    outcomes: dict[int, Outcome] = {}

    def on_result(i: int, result: dict) -> None:
        outcomes[i] = _done(sweep_dir, mine[i], result, started, locks, packed_runs=len(mine))

    try:
        cfgs = [from_dict(_quiet(e["config"])) for e in mine]
        train_pack(cfgs, [sweep_dir / e["name"] for e in mine], stop=stop, on_result=on_result)
    except KeyboardInterrupt:
        raise
    except NotPackable:  # the model family changed shape: train the runs one by one
        return [_run_one(sweep_dir, e, locks) for e in mine]
    except Exception as error:  # noqa: BLE001 - the pack's unfinished runs are recorded as failed
        for i, e in enumerate(mine):
            if i not in outcomes:
                outcomes[i] = _failed(sweep_dir, e, started, locks, error)
    for i, e in enumerate(mine):
        if i not in outcomes:
            outcomes[i] = Outcome(e["id"], e["name"], INTERRUPTED)
    return [outcomes[i] for i in range(len(mine))]


def _quiet(config: dict) -> dict:
    """No progress bar inside a sweep (log.* are layout keys: the run's id does not change)."""
    config = json.loads(json.dumps(config))
    config.setdefault("log", {})["progress"] = False
    return config
