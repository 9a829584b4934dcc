"""The SLURM executor: a sweep's tasks as one job array (slurm/sweep_array.sh runs `harness sweep-task TASK_FILE
INDEX` per array task), and the array task's side."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from harness.core.errors import LaunchError, SweepError
from harness.core.io import atomic_write_json, read_json
from harness.core.paths import REPO_ROOT
from harness.sweep.state import prepare, record_submission, state_dir, status
from harness.sweep.tasks import Outcome, TaskSignals, execute_task, group_tasks


def array_script() -> Path:
    return REPO_ROOT / "slurm" / "sweep_array.sh"


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
           f"--export=ALL,HARNESS_PYTHON={sys.executable},HARNESS_ROOT={REPO_ROOT}"]
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
    progress checkpoints (harness/train/signals.py; forwarded to a launched run, which turns SIGUSR1 into RUN_DIR/STOP)."""
    data = read_json(task_file)
    tasks = data["tasks"]
    if not 0 <= index < len(tasks):
        raise LaunchError(f"array task {index} is outside 0..{len(tasks) - 1} of {task_file}")
    signals = TaskSignals()
    signals.install()
    return execute_task(Path(data["sweep_dir"]), tasks[index], data.get("pack", True), signals, data.get("launch"))


def submit_sweep(sweep, sweep_dir: Path, max_parallel: int, pack: bool, wait: bool) -> int:
    """Submit what is missing of a sweep (and not queued in an earlier array) as one SLURM job array."""
    entries = prepare(sweep, sweep_dir)
    st = status(entries, sweep_dir)
    launch = launch_settings(sweep.spec.slurm)
    pack = pack and launch is None  # a launched run has processes of its own
    tasks = group_tasks(st.missing, pack, sweep.spec.executor.max_pack_runs, sweep.spec.slurm.runs_per_task)
    print(f"sweep {sweep.name}: {len(entries)} runs in {sweep_dir}: {len(st.finished)} finished, "
          f"{len(st.running)} running, {len(st.queued)} queued in earlier arrays, {len(st.missing)} to run", flush=True)
    if not tasks:
        return 0
    task_file = write_task_file(sweep_dir, tasks, pack, launch)
    print(f"sweep: {sweep.spec.slurm.describe()}", flush=True)
    cmd = sbatch_command(sweep.name, sweep_dir, task_file, len(tasks), max_parallel, sweep.spec.slurm, wait)
    print("sweep: " + " ".join(cmd), flush=True)
    if wait:  # sbatch --wait returns at the end; record the array first so a parallel resubmission sees it
        print(f"sweep {sweep.name}: waiting for the job array ({len(tasks)} tasks, at most {max_parallel} at once)", flush=True)
    job = submit_slurm(cmd, on_job=lambda j: record_submission(sweep_dir, j, task_file))
    print(f"sweep {sweep.name}: submitted job array {job}: {len(tasks)} tasks, at most {max_parallel} at once; "
          f"logs in {sweep_dir}/.sweep/slurm/; watch: squeue -j {job}; "
          f"afterwards: harness analyze {sweep_dir} (run the same sweep command again to fill in what is missing)")
    return 0
