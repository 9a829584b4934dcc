"""Stop requests: SIGUSR1/SIGTERM (SLURM's warning signal, preemption), Ctrl-C (SIGINT) or a `STOP` file in the
run dir.

A handler only sets a flag; the train loop checks it at the next step boundary, where all ranks agree
on it through the per-step all-reduce, checkpoint, and exit cleanly (exit 0). Inside a SLURM job, rank 0
then requeues the job with `scontrol requeue` (only this array task, never the whole array: Lightning
#15022), on SIGTERM as well as SIGUSR1 (Lightning #20542). If scontrol is missing (Lightning #21404) it
says so and exits with the checkpoint saved.

Ctrl-C stops the same way but exits 130 (the shell's code for SIGINT), and a second Ctrl-C stops at once. Under
torchrun a Ctrl-C reaches each rank twice: from the terminal (the whole foreground process group) and from the
agent, which forwards the SIGINT it got to every worker and SIGKILLs them TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30) s
later (torch/distributed/elastic/agent/server/api.py, `run`: `_shutdown(e.sigval)`). A SIGINT within
DUPLICATE_SIGINT_SECONDS of the first is that same Ctrl-C, not a second one.

A STOP file older than the process is stale: it was left by a process that was killed before it could act on it
(a normal stop removes it), and it is ignored with one line instead of stopping the new segment after one step.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

# A stop asked of the whole process before or between runs (a sweep task's signal handler, harness/sweep/tasks.py):
# a run that starts or is starting in this process stops at its first step boundary.
_process_stop: str | None = None


def request_stop(reason: str) -> None:
    global _process_stop
    _process_stop = reason


DUPLICATE_SIGINT_SECONDS = 2.0


class StopRequest:
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, run_dir: Path, started: float = 0.0, say: Callable[[str], None] = lambda text: None):
        """`started`: when this process started the run (time.time()); a STOP file older than that is stale."""
        self.stop_file = Path(run_dir) / "STOP"
        self.started = started
        self.signal_name: str | None = None
        self.interrupted = False  # Ctrl-C (SIGINT): the run stops with exit 130
        self._first_sigint: float | None = None
        self._next_look = 0.0
        self._previous = {}
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a sweep worker thread): rely on the STOP file
                pass
        # Ctrl-C only where nobody else handles it (`harness train`, a torchrun rank): a sweep ignores it in its
        # workers and stops its runs with SIGUSR1 (harness/sweep/local.py).
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler and \
                threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        self._drop_stale_stop_file(say)

    def _drop_stale_stop_file(self, say: Callable[[str], None]) -> None:
        try:
            written = self.stop_file.stat().st_mtime
        except FileNotFoundError:
            return
        if written < self.started:
            say(f"ignoring the STOP file in {self.stop_file.parent}: it was written at "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(written))}, before this run started "
                "(left by a process that was killed); touch it again to stop this run")
            self.stop_file.unlink(missing_ok=True)

    def _interrupt(self, signum, frame) -> None:
        now = time.monotonic()
        if self._first_sigint is None:
            self._first_sigint, self.interrupted = now, True
            self.signal_name = self.signal_name or "SIGINT"
            if int(os.environ.get("RANK", "0")) == 0:
                print("harness: Ctrl-C: stopping at the end of this step, with a checkpoint (Ctrl-C again: stop at "
                      "once, without one)", file=sys.stderr, flush=True)
        elif now - self._first_sigint > DUPLICATE_SIGINT_SECONDS:
            raise KeyboardInterrupt  # the CLI prints one line and exits 130

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

    def stop_file_fresh(self) -> bool:
        """A STOP file written since this run started (from any thread: the stall watch's)."""
        try:
            return self.stop_file.stat().st_mtime >= self.started
        except FileNotFoundError:
            return False

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self.stop_file.unlink(missing_ok=True)


class StallWatch:
    """The STOP file, while a step waits for a rank that stopped answering.

    The main thread then sits inside a collective (gloo or NCCL) until the collective timeout
    (distributed.timeout_minutes) and cannot look at the STOP file. This thread can: when a step has run for
    longer than STALL_FACTOR times the slowest step so far (and at least STALL_MIN_SECONDS), and a fresh STOP
    file is there, it ends the process with one line and exit 5. No checkpoint is possible there (the step is
    half done and a rank is missing); the run resumes from its last one. The first step of a segment (compile,
    autotuning) is never judged stalled: there is no step time to compare it with.
    """

    STALL_FACTOR = 5.0
    STALL_MIN_SECONDS = 10.0
    POLL_SECONDS = 1.0

    def __init__(self, stop: StopRequest, rank: int, last_checkpoint: Callable[[], str], exit_code: int):
        self.stop, self.rank, self.last_checkpoint, self.exit_code = stop, rank, last_checkpoint, exit_code
        self._step: int | None = None
        self._since = 0.0
        self._slowest: float | None = None
        self._first = True
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-watch", daemon=True)
        self._thread.start()

    def begin(self, step: int) -> None:
        self._step, self._since = step, time.monotonic()

    def end(self) -> None:
        took = time.monotonic() - self._since
        if self._first:  # start-up (compile, autotuning, first collectives) says nothing about a step's time
            self._first = False
        else:
            self._slowest = took if self._slowest is None else max(self._slowest, took)
        self._step = None

    def close(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(self.POLL_SECONDS):
            step, slowest = self._step, self._slowest
            if step is None or slowest is None:
                continue
            waited = time.monotonic() - self._since
            if waited > max(self.STALL_MIN_SECONDS, self.STALL_FACTOR * slowest) and self.stop.stop_file_fresh():
                print(f"harness: error: rank {self.rank}: STOP file seen while step {step + 1} has waited "
                      f"{waited:.0f} s for another rank (frozen, stopped or lost?): exiting without a checkpoint; "
                      f"{self.last_checkpoint()}", file=sys.stderr, flush=True)
                os._exit(self.exit_code)  # the main thread is stuck in C++; nothing else can end it


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
