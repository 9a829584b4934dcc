"""The SLURM executor: a sweep's tasks as job arrays (slurm/sweep_array.sh runs `harness sweep-task TASK_FILE
INDEX` per array task), and the array task's side. One array unless SLURM's limits (slurm_limits.py: MaxArraySize,
submit limits) need several; then each has its own task file and starts when the one before has ended."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from harness.core.errors import LaunchError, SweepError
from harness.core.io import atomic_write_json, read_json
from harness.core.paths import REPO_ROOT
from harness.sweep.slurm_limits import describe_arrays, plan_arrays, read_limits
from harness.sweep.state import prepare, record_submission, state_dir, status
from harness.sweep.tasks import Outcome, TaskSignals, describe_packing, execute_task, group_tasks


def array_script() -> Path:
    return REPO_ROOT / "slurm" / "sweep_array.sh"


def write_task_file(sweep_dir: Path, tasks: list[list[dict]], pack: Optional[bool], launch: Optional[dict] = None,
                    part: int = 0) -> Path:
    """An array's task list (`part`: which array of this submission); `launch` ({"nproc_per_node": P or None}) when
    each run starts through python -m launch."""
    directory = state_dir(sweep_dir) / "slurm"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"tasks-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{part}.json"
    atomic_write_json(path, {"sweep_dir": str(Path(sweep_dir).resolve()), "pack": pack, "launch": launch,
                             "tasks": tasks})
    return path


def launch_settings(slurm) -> Optional[dict]:
    """What a task file carries for runs that start through the launch entry (None: train in the task process)."""
    return {"nproc_per_node": slurm.nproc_per_node} if slurm.launched else None


def sbatch_command(sweep_name: str, sweep_dir: Path, task_file: Path, n_tasks: int, max_parallel: int, slurm,
                   wait: bool, after: Optional[str] = None) -> list[str]:
    """`sbatch --array=0-(T-1)%P ... slurm/sweep_array.sh TASK_FILE`: at most P tasks run at once; `after`: the
    array (job id) this one waits for, whatever its end (afterany), so P also bounds the tasks of several arrays."""
    logs = state_dir(sweep_dir).resolve() / "slurm"
    cmd = ["sbatch", "--parsable", f"--array=0-{n_tasks - 1}%{max_parallel}", f"--job-name=sweep-{sweep_name}",
           f"--output={logs}/%A_%a.out", f"--time={slurm.time}",
           f"--export=ALL,HARNESS_PYTHON={sys.executable},HARNESS_ROOT={REPO_ROOT}"]
    if slurm.launched:  # one task per node: the launch entry's srun starts a torchrun on each
        cmd += [f"--nodes={slurm.nodes}", f"--ntasks={slurm.nodes}", "--ntasks-per-node=1"]
    for flag, value in (("--partition", slurm.partition), ("--account", slurm.account),
                        ("--gpus-per-task", slurm.gpus_per_task), ("--gpus-per-node", slurm.gpus_per_node),
                        ("--cpus-per-task", slurm.cpus_per_task), ("--mem", slurm.mem)):
        if value is not None:
            cmd.append(f"{flag}={value}")
    cmd += list(slurm.extra_args)
    if after:
        cmd.append(f"--dependency=afterany:{after}")
    if wait:
        cmd.append("--wait")
    return cmd + [str(array_script()), str(task_file.resolve())]


def start_sbatch(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    """Start sbatch; return it and the job id (`--parsable` prints it first, also under `--wait`, which then
    blocks until the array ends and exits non-zero if a task failed)."""
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise LaunchError("sbatch not found: the slurm executor needs SLURM's client commands on PATH; "
                          "use --executor local here") from None
    first = proc.stdout.readline().strip()
    job = first.split(";")[0] if first and first.split(";")[0].isdigit() else None
    if job is None:
        out, err = proc.communicate()
        msg = (err or first or out).strip().splitlines()
        raise LaunchError(f"sbatch failed (exit {proc.returncode}): {msg[-1] if msg else 'no message'}")
    return proc, job


def finish_sbatch(arrays: list[tuple[subprocess.Popen, str]]) -> None:
    """Wait for the sbatch processes (each returns at once, or under --wait when its array has ended)."""
    failed = []
    for proc, job in arrays:
        proc.communicate()
        if proc.returncode != 0:
            failed.append(job)
    if failed:
        raise SweepError(f"job array(s) {', '.join(failed)} ended with failed tasks (sbatch --wait exit non-zero); "
                         "their logs are in .sweep/slurm/ of the sweep directory; run the sweep again for what is missing")


def submit_arrays(sweep_dir: Path, name: str, tasks: list[list[dict]], arrays: list[range], pack: Optional[bool],
                  launch: Optional[dict], max_parallel: int, slurm, wait: bool) -> list[str]:
    """Submit each array (its own task file), each after the one before, and record it in submitted.jsonl as
    soon as sbatch names it, so a parallel resubmission sees it; under `wait`, return when all have ended."""
    started: list[tuple[subprocess.Popen, str]] = []
    for part, indices in enumerate(arrays):
        task_file = write_task_file(sweep_dir, [tasks[i] for i in indices], pack, launch, part)
        cmd = sbatch_command(name, sweep_dir, task_file, len(indices), max_parallel, slurm, wait,
                             after=started[-1][1] if started else None)
        print("sweep: " + " ".join(cmd), flush=True)
        try:
            proc, job = start_sbatch(cmd)
        except LaunchError as e:
            if not started:
                raise
            raise LaunchError(f"{e}, for array {part + 1} of {len(arrays)}; arrays {', '.join(j for _, j in started)} "
                              "were submitted before it and recorded: run the same command again after fixing this, "
                              "it leaves their runs to them and submits the rest") from None
        record_submission(sweep_dir, job, task_file)
        started.append((proc, job))
        print(f"sweep {name}: submitted job array {job}: {len(indices)} tasks, at most {max_parallel} at once"
              + (f" (array {part + 1} of {len(arrays)})" if len(arrays) > 1 else ""), flush=True)
        if not wait:
            finish_sbatch([started[-1]])
    if wait:
        print(f"sweep {name}: waiting for {len(started)} job array(s) ({len(tasks)} tasks)", flush=True)
        finish_sbatch(started)
    return [job for _, job in started]


def run_task_file(task_file: Path, index: int) -> list[Outcome]:
    """One SLURM array task: its list of runs, in this process or each through the launch entry (the task
    file's `launch`). SIGUSR1/SIGTERM (time limit, preemption) stop it at the next run boundary; the run in
    progress checkpoints (harness/train/signals.py; forwarded to a launched run, which turns SIGUSR1 into RUN_DIR/STOP)."""
    data = read_json(task_file)
    tasks = data["tasks"]
    if not 0 <= index < len(tasks):
        raise LaunchError(f"array task {index} is outside 0..{len(tasks) - 1} of {task_file}")
    signals = TaskSignals()
    signals.install()
    return execute_task(Path(data["sweep_dir"]), tasks[index], data.get("pack", True), signals, data.get("launch"))


def submit_sweep(sweep, sweep_dir: Path, max_parallel: int, pack: Optional[bool], wait: bool) -> int:
    """Submit what is missing of a sweep (and not queued in an earlier array) as job arrays within SLURM's limits."""
    submit_missing(sweep, sweep_dir, max_parallel, pack, wait)
    return 0


def submit_missing(sweep, sweep_dir: Path, max_parallel: int, pack: bool, wait: bool) -> list[str]:
    """submit_sweep's work; returns the job ids of the arrays it submitted (the adaptive search's planner job
    waits for them: harness/sweep/search.py)."""
    entries = prepare(sweep, sweep_dir)
    st = status(entries, sweep_dir)
    slurm = sweep.spec.slurm
    launch = launch_settings(slurm)
    pack = pack if launch is None else False  # a launched run has processes of its own
    # The tasks run on compute nodes: device auto is CUDA there when the tasks ask for GPUs.
    tasks = group_tasks(st.missing, pack, sweep.spec.executor.pack_size, slurm.runs_per_task, slurm.requests_gpus)
    print(f"sweep {sweep.name}: {len(entries)} runs in {sweep_dir}: {len(st.finished)} finished, "
          f"{len(st.running)} running, {len(st.queued)} queued in earlier arrays, {len(st.missing)} to run", flush=True)
    if not tasks:
        return []
    limits = read_limits(slurm.extra_args)
    arrays = plan_arrays(len(tasks), limits)  # refuses, naming the limit, when even several arrays cannot fit
    print(f"sweep: {describe_arrays(arrays, limits, max_parallel)}", flush=True)
    print(f"sweep: {slurm.describe()}", flush=True)
    print(f"sweep: {describe_packing(st.missing, pack, slurm.requests_gpus)}", flush=True)
    jobs = submit_arrays(sweep_dir, sweep.name, tasks, arrays, pack, launch, max_parallel, slurm, wait)
    print(f"sweep {sweep.name}: {len(jobs)} job array(s), {len(tasks)} tasks; logs in {sweep_dir}/.sweep/slurm/; "
          f"watch: squeue -j {','.join(jobs)}; afterwards: harness analyze {sweep_dir} "
          "(run the same sweep command again to fill in what is missing)")
    return jobs
