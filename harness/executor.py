"""Running a sweep: which runs are missing, how they are grouped into tasks, and the local and SLURM executors.

    SWEEP_DIR/sweep.yaml            the spec as run (base config inlined): analysis reads select.k/n from it
    SWEEP_DIR/<run name>/           one ordinary run directory per run (config.yaml, result.json, tb/, ...)
    SWEEP_DIR/events...hparams      the TensorBoard HParams experiment (harness/hparams.py)
    SWEEP_DIR/.sweep/runs.json      every run of the current spec: id, name, grid point, resolved config
    SWEEP_DIR/.sweep/locks/         one lock per run in progress (harness/locks.py)
    SWEEP_DIR/.sweep/history.jsonl  one line per run executed: who ran it, when, and how it ended
    SWEEP_DIR/.sweep/slurm/         task files and job-array logs

A run is finished when its result.json says completed or diverged (a diverged run is a result: the paper
counts it as the worst value; it is never retried). Anything else (never started, interrupted, failed) is
missing, and a resubmission runs exactly the missing runs that no live executor holds: finished run
directories are not touched. A task is a list of runs for one process: a pack (harness/packed.py) or
runs trained one after another in-process (no start-up per run).
"""

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
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Optional

import yaml

from harness import configlib
from harness.errors import ConfigError, LaunchError, SweepError
from harness.locks import STALE_AFTER_SECONDS, RunLocks, describe, is_stale, read_lock
from harness.rundir import atomic_write_json, atomic_write_text, read_json
from harness.sweep import Run, Sweep, run_steps

STATE = ".sweep"
FINISHED = ("completed", "diverged")
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
    result = result_of(run_dir)
    return bool(result) and result.get("status") in FINISHED


def hparams_of(run: Run, keys: list[str]) -> dict:
    from harness.sweep import get_dotted

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
        from harness import hparams

        domains = {k: [e["hparams"].get(k) for e in entries] for k in entries[0]["hparams"]}
        domains = {k: v for k, v in domains.items() if any(x is not None for x in v)}
        hparams.write_experiment(sweep_dir, domains, _test_metric(sweep.runs[0]), sweep.spec.description)
    return entries


def _test_metric(run: Run) -> str:
    """The metric the trainer will report, for the HParams experiment (before any run finished)."""
    from data_pipelines import describe as describe_data
    from harness import objectives

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


# ---------------------------------------------------------------------------------------------- tasks


def plan_tasks(entries: list[dict], pack: bool, max_pack: int, runs_per_task: int) -> list[list[dict]]:
    """Group runs into tasks: packs of runs that may train as one model, else `runs_per_task` per task.
    Largest tasks first, so a pool of workers ends together."""
    from harness.packed import pack_key

    tasks, packs = [], {}
    singles = []
    for e in entries:
        key = pack_key(e["config"]) if pack else None
        if key is None:
            singles.append(e)
        else:
            packs.setdefault(key, []).append(e)
    for group in packs.values():
        tasks += [group[i:i + max_pack] for i in range(0, len(group), max_pack)]
    tasks += [singles[i:i + runs_per_task] for i in range(0, len(singles), runs_per_task)]
    return sorted(tasks, key=_task_cost, reverse=True)


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
    the signal itself (harness/signals.py); a run started through the launch entry gets it forwarded."""

    def __init__(self):
        self.requested = False
        self.child: Optional[subprocess.Popen] = None

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame) -> None:
        from harness.signals import request_stop

        self.requested = True
        request_stop(signal.Signals(signum).name)  # a run starting in this process stops at its first step
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)


def execute_task(sweep_dir: Path, entries: list[dict], pack: bool = True, signals: Optional[TaskSignals] = None,
                 launch: Optional[dict] = None) -> list[Outcome]:
    """Run one task's runs: lock each, train (as a pack if possible), release. Runs train in THIS process,
    unless `launch` is given ({"nproc_per_node": P or None}): then each starts through `python -m launch`
    (several processes, several nodes inside a SLURM job) and this process waits for it."""
    from harness.packed import pack_key

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
        packable = pack and launch is None and len(mine) > 1 \
            and len({pack_key(e["config"]) for e in mine} - {None}) == 1 and pack_key(mine[0]["config"]) is not None
        if launch is not None:
            for e in mine:
                if stop is not None and stop():
                    break
                outcomes.append(_run_launched(sweep_dir, e, locks, launch, signals))
                if outcomes[-1].status == "interrupted":
                    break
        elif packable:
            outcomes += _run_pack(sweep_dir, mine, locks, stop)
        else:
            for e in mine:
                if stop is not None and stop():
                    break
                outcomes.append(_run_one(sweep_dir, e, locks))
                if outcomes[-1].status == "interrupted":
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
        from harness import hparams

        hparams.write_session(run_dir, e["hparams"], result)
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
    from harness.config import from_dict
    from harness.trainer import train

    started = time.time()
    run_dir = sweep_dir / e["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        cfg = from_dict(_quiet(e["config"]))
        with open(run_dir / "train.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            result = train(cfg, run_dir)
    except KeyboardInterrupt:
        raise
    except Exception as error:  # noqa: BLE001 - a failed run is recorded and the task goes on
        return _failed(sweep_dir, e, started, locks, error)
    if result.get("status") not in FINISHED:
        _record(sweep_dir, e, result.get("status", "?"), started)
        locks.release(e["id"])
        return Outcome(e["id"], e["name"], result.get("status", "interrupted"))
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
    root = str(Path(__file__).resolve().parent.parent)
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
        _record(sweep_dir, e, "interrupted", started, exit_code=code)
        locks.release(e["id"])
        return Outcome(e["id"], e["name"], "interrupted")
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    why = (errors or lines or ["no output"])[-1].strip()
    return _failed(sweep_dir, e, started, locks, LaunchedRunError(f"python -m launch exited {code}: {why} "
                                                                   f"(whole log: {log_path})"))


def _run_pack(sweep_dir: Path, mine: list[dict], locks: RunLocks, stop) -> list[Outcome]:
    from harness.config import from_dict
    from harness.packed import NotPackable, train_pack

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
            outcomes[i] = Outcome(e["id"], e["name"], "interrupted")
    return [outcomes[i] for i in range(len(mine))]


def _quiet(config: dict) -> dict:
    """No progress bar inside a sweep (log.* are layout keys: the run's id does not change)."""
    config = json.loads(json.dumps(config))
    config.setdefault("log", {})["progress"] = False
    return config


# ---------------------------------------------------------------------------------------------- local executor


_WORKER_SIGNALS: Optional[TaskSignals] = None


def _init_worker(threads: int, pids) -> None:
    global _WORKER_SIGNALS
    import torch

    if threads:
        torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops the workers
    _WORKER_SIGNALS = TaskSignals()  # SIGUSR1 from the parent: stop after the run in progress (checkpointed)
    _WORKER_SIGNALS.install()
    pids.put(os.getpid())


def _worker(sweep_dir: str, task: list[dict], pack: bool) -> list[Outcome]:
    return execute_task(Path(sweep_dir), task, pack, _WORKER_SIGNALS)


class _Stop(Exception):
    pass


@dataclass
class LocalRun:
    outcomes: list[Outcome]
    stopped_by: Optional[str] = None  # the signal that stopped the sweep early (runs in progress checkpointed)


def run_local(sweep_dir: Path, tasks: list[list[dict]], max_parallel: int, pack: bool,
              report: Callable[[Outcome], None]) -> LocalRun:
    """A pool of `max_parallel` worker processes (1: this process), each taking whole tasks.

    Ctrl-C (SIGINT), SIGTERM or SIGUSR1 stop the sweep gracefully: no new run starts, every run in progress
    stops at its next step with a checkpoint (a pack stops without one), and the same command resumes them. A
    second Ctrl-C stops at once (the runs resume from their last periodic checkpoint)."""
    import torch

    run = LocalRun([])
    cores = os.cpu_count() or 1
    # Threads per worker: the cores shared out, unless OMP_NUM_THREADS says otherwise (torch reads it itself).
    workers = max(1, min(max_parallel, len(tasks)))
    threads = 0 if "OMP_NUM_THREADS" in os.environ else max(1, cores // workers)

    def collect(outcomes: list[Outcome]) -> None:
        for o in outcomes:
            report(o)
            run.outcomes.append(o)

    if workers == 1:
        if threads:
            torch.set_num_threads(threads)
        signals = TaskSignals()

        def on_int(signum, frame):
            if signals.requested:
                raise KeyboardInterrupt
            run.stopped_by = run.stopped_by or "SIGINT"
            _say_stopping(run.stopped_by)
            os.kill(os.getpid(), signal.SIGUSR1)  # the trainer's stop request (harness/signals.py), or `signals`

        def on_stop(signum, frame):
            run.stopped_by = run.stopped_by or signal.Signals(signum).name
            signals.handle(signum, frame)

        previous = {sig: signal.signal(sig, handler) for sig, handler in
                    ((signal.SIGINT, on_int), (signal.SIGUSR1, on_stop), (signal.SIGTERM, on_stop))}
        try:
            for task in tasks:
                if signals.requested:
                    break
                collect(execute_task(sweep_dir, task, pack, signals))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return run

    ctx = get_context("spawn")
    pids = ctx.SimpleQueue()

    def on_signal(signum, frame):
        run.stopped_by = signal.Signals(signum).name
        raise _Stop

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)}
    try:
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads, pids)) as pool:
            futures = [pool.submit(_worker, str(sweep_dir), task, pack) for task in tasks]
            try:
                for future in as_completed(futures):
                    collect(future.result())
            except _Stop:
                _stop_workers(futures, pids, run, collect)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return run


def _say_stopping(reason: str) -> None:
    print(f"sweep: {reason}: the runs in progress stop at their next step, with a checkpoint unless packed "
          "(Ctrl-C again: stop at once)", file=sys.__stderr__, flush=True)  # not a run's train.log


def _stop_workers(futures, pids, run: LocalRun, collect) -> None:
    """Cancel what has not started; ask every worker to stop its run at the next step; wait for them."""
    for f in futures:
        f.cancel()
    workers = []
    while not pids.empty():
        workers.append(pids.get())

    def kill(signum, frame):  # a second Ctrl-C: stop now
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, kill)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
    _say_stopping(run.stopped_by)
    for f in futures:
        if not f.cancelled():
            with contextlib.suppress(Exception):  # a worker that died: its runs are missing, run again
                collect(f.result())


# ---------------------------------------------------------------------------------------------- SLURM executor


def array_script() -> Path:
    return Path(__file__).resolve().parent.parent / "slurm" / "sweep_array.sh"


def write_task_file(sweep_dir: Path, tasks: list[list[dict]], pack: bool, launch: Optional[dict] = None) -> Path:
    """The array's task list; `launch` ({"nproc_per_node": P or None}) when each run starts through python -m launch."""
    directory = state_dir(sweep_dir) / "slurm"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"tasks-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    atomic_write_json(path, {"sweep_dir": str(Path(sweep_dir).resolve()), "pack": pack, "launch": launch,
                             "tasks": tasks})
    return path


def launch_settings(slurm) -> Optional[dict]:
    """What a task file carries for runs that start through the launch entry (None: train in the task process)."""
    return {"nproc_per_node": slurm.nproc_per_node} if slurm.launched else None


def sbatch_command(sweep_name: str, sweep_dir: Path, task_file: Path, n_tasks: int, max_parallel: int, slurm,
                   wait: bool) -> list[str]:
    """`sbatch --array=0-(T-1)%P ... slurm/sweep_array.sh TASK_FILE`: at most P tasks run at once."""
    logs = state_dir(sweep_dir).resolve() / "slurm"
    cmd = ["sbatch", "--parsable", f"--array=0-{n_tasks - 1}%{max_parallel}", f"--job-name=sweep-{sweep_name}",
           f"--output={logs}/%A_%a.out", f"--time={slurm.time}",
           f"--export=ALL,HARNESS_PYTHON={sys.executable},HARNESS_ROOT={array_script().parent.parent}"]
    if slurm.launched:  # one task per node: the launch entry's srun starts a torchrun on each
        cmd += [f"--nodes={slurm.nodes}", f"--ntasks={slurm.nodes}", "--ntasks-per-node=1"]
    for flag, value in (("--partition", slurm.partition), ("--account", slurm.account),
                        ("--gpus-per-task", slurm.gpus_per_task), ("--gpus-per-node", slurm.gpus_per_node),
                        ("--cpus-per-task", slurm.cpus_per_task), ("--mem", slurm.mem)):
        if value is not None:
            cmd.append(f"{flag}={value}")
    cmd += list(slurm.extra_args)
    if wait:
        cmd.append("--wait")
    return cmd + [str(array_script()), str(task_file.resolve())]


def submit_slurm(cmd: list[str], on_job: Optional[Callable[[str], None]] = None) -> str:
    """Run sbatch; return the job id (`--parsable` prints it first, also under `--wait`, which then blocks
    until the array ends and exits non-zero if a task failed)."""
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise LaunchError("sbatch not found: the slurm executor needs SLURM's client commands on PATH; "
                          "use --executor local here") from None
    first = proc.stdout.readline().strip()
    job = first.split(";")[0] if first and first.split(";")[0].isdigit() else None
    if job and on_job:
        on_job(job)
    out, err = proc.communicate()
    if job is None:
        msg = (err or first or out).strip().splitlines()
        raise LaunchError(f"sbatch failed (exit {proc.returncode}): {msg[-1] if msg else 'no message'}")
    if proc.returncode != 0:
        raise SweepError(f"job array {job} ended with failed tasks (sbatch --wait exit {proc.returncode}); their logs "
                         "are in .sweep/slurm/ of the sweep directory; run the sweep again for what is missing")
    return job


def run_task_file(task_file: Path, index: int) -> list[Outcome]:
    """One SLURM array task: its list of runs, in this process or each through the launch entry (the task
    file's `launch`). SIGUSR1/SIGTERM (time limit, preemption) stop it at the next run boundary; the run in
    progress checkpoints (harness/signals.py; forwarded to a launched run, which turns SIGUSR1 into RUN_DIR/STOP)."""
    data = read_json(task_file)
    tasks = data["tasks"]
    if not 0 <= index < len(tasks):
        raise LaunchError(f"array task {index} is outside 0..{len(tasks) - 1} of {task_file}")
    signals = TaskSignals()
    signals.install()
    return execute_task(Path(data["sweep_dir"]), tasks[index], data.get("pack", True), signals, data.get("launch"))
