"""Stop requests: SIGUSR1/SIGTERM (SLURM's warning signal, preemption) or a `STOP` file in the run dir.

A handler only sets a flag; the train loop checks it at the next step boundary, where all ranks agree
on it through the per-step all-reduce, checkpoint, and exit cleanly (exit 0). Inside a SLURM job, rank 0
then requeues the job with `scontrol requeue` (only this array task, never the whole array: Lightning
#15022), on SIGTERM as well as SIGUSR1 (Lightning #20542). If scontrol is missing (Lightning #21404) it
says so and exits with the checkpoint saved.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

# A stop asked of the whole process before or between runs (a sweep task's signal handler, harness/sweep/tasks.py):
# a run that starts or is starting in this process stops at its first step boundary.
_process_stop: str | None = None


def request_stop(reason: str) -> None:
    global _process_stop
    _process_stop = reason


class StopRequest:
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, run_dir: Path):
        self.stop_file = Path(run_dir) / "STOP"
        self.signal_name: str | None = None
        self._next_look = 0.0
        self._previous = {}
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a sweep worker thread): rely on the STOP file
                pass

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        previous = self._previous.get(signum)
        if callable(previous):  # a sweep task's handler (harness/sweep/tasks.py): it stops after this run too
            previous(signum, frame)

    def requested(self) -> bool:
        if self.signal_name is None and _process_stop is not None:
            self.signal_name = _process_stop
        if self.signal_name is None and time.monotonic() >= self._next_look:
            # A stat per step and rank is slow on a parallel file system; once a second is soon enough.
            self._next_look = time.monotonic() + 1.0
            if self.stop_file.exists():
                self.signal_name = "STOP file"
        return self.signal_name is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self.stop_file.unlink(missing_ok=True)


def slurm_job_target() -> str | None:
    """The id to requeue: `<array job id>_<task id>` for an array task (never the whole array), else the job id."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array_job}_{task}" if array_job and task else job


def requeue_slurm_job() -> str | None:
    """Inside SLURM, ask it to requeue this job; return what happened, for the log (None outside SLURM).

    Called by rank 0 after the checkpoint is saved, so whatever happens next (SLURM kills the job to requeue
    it, or scontrol is missing as in many containers) the run resumes from that checkpoint.
    """
    target = slurm_job_target()
    if target is None:
        return None
    exe = shutil.which("scontrol")
    if exe is None:
        return (f"scontrol is not on PATH (a container without SLURM's client?): cannot requeue SLURM job {target}; "
                "the checkpoint is saved: resubmit the same command to continue")
    try:
        proc = subprocess.run([exe, "requeue", target], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol requeue {target} failed ({e}); the checkpoint is saved: resubmit the same command to continue"
    if proc.returncode < 0:
        # SLURM stops the whole job to requeue it, scontrol included, often before scontrol returns.
        return f"requeue of SLURM job {target} accepted (SLURM is stopping this job to requeue it)"
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()
        return (f"scontrol requeue {target} failed ({why[-1] if why else f'exit {proc.returncode}'}); "
                "the checkpoint is saved: resubmit the same command to continue")
    return f"requeued SLURM job {target}: it will resume from this checkpoint"
