"""The local executor: a pool of worker processes on this machine, each taking whole tasks, stopped gracefully
by Ctrl-C, SIGTERM or SIGUSR1.

Workers die with the executor. A spawn-mode pool has no parent-death check of its own: a SIGKILLed executor's
workers would go on training, holding run locks, then take the tasks still queued and wait for ever on a pipe
nobody writes. So each worker asks the kernel for SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG, Linux),
checks that its parent is still the executor (it may have died before the prctl), and watches the parent pid from
a thread (other systems; and to exit once the run in progress has stopped with its checkpoint).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Optional

from harness.core.errors import SweepError, SweepStopped
from harness.core.status import COMPLETED, DIVERGED, INTERRUPTED
from harness.core.threads import choose_threads
from harness.sweep.locks import describe
from harness.sweep.state import prepare, status
from harness.sweep.tasks import Outcome, TaskSignals, describe_packing, execute_task, group_tasks

_WORKER_SIGNALS: Optional[TaskSignals] = None
_PARENT: Optional[int] = None  # the executor's pid, as it was when this worker started
_BUSY = threading.Event()  # a task is running in this worker
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
ORPHAN_GRACE_SECONDS = 300.0  # an orphan's run that has not stopped by then (a hung step) is abandoned


def _init_worker(threads: int, pids, counter, parent: int) -> None:
    global _WORKER_SIGNALS
    from harness.core.memory import keep_freed_memory

    keep_freed_memory()  # a spawned worker does not go through harness.cli.main
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops the workers
    _WORKER_SIGNALS = TaskSignals()  # SIGUSR1 from the parent: stop after the run in progress (checkpointed)
    _WORKER_SIGNALS.install()  # SIGTERM too: what the kernel sends when the parent dies
    die_with_parent(parent)
    assign_device(counter, torch.cuda.device_count())
    if threads:
        torch.set_num_threads(threads)
    pids.put(os.getpid())


def die_with_parent(parent: int) -> None:
    """SIGTERM from the kernel when the parent dies, then exit once the run in progress has checkpointed.

    PR_SET_PDEATHSIG follows the *thread* that created this process (prctl(2)); ProcessPoolExecutor spawns its
    workers from the thread that calls submit(), here the executor's main thread, which lives as long as it does.
    """
    global _PARENT
    _PARENT = parent
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the prctl: nobody will ever send us work
        os._exit(0)
    threading.Thread(target=_watch_parent, name="parent-watch", daemon=True).start()


def _orphaned() -> bool:
    return _PARENT is not None and os.getppid() != _PARENT


def _watch_parent() -> None:
    while not _orphaned():
        time.sleep(1.0)
    if _BUSY.is_set() and _WORKER_SIGNALS is not None:
        _WORKER_SIGNALS.handle(signal.SIGTERM, None)  # where no prctl did: stop the run at its next step
        deadline = time.monotonic() + ORPHAN_GRACE_SECONDS
        while _BUSY.is_set() and time.monotonic() < deadline:
            time.sleep(0.2)
    os._exit(0)  # _worker exits itself once its task has stopped; this covers an idle worker


def assign_device(counter, devices: int) -> int:
    """Worker k of the pool trains on GPU k mod (visible GPUs): LOCAL_RANK, as a launched rank's (the trainer
    picks cuda:LOCAL_RANK). Without it every worker would train on cuda:0."""
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    os.environ["LOCAL_RANK"] = str(index % max(1, devices))
    return index


def _worker(sweep_dir: str, task: list[dict], pack: bool) -> list[Outcome]:
    if _orphaned():  # a task the dead executor had queued: leave it to the next executor
        os._exit(0)
    _BUSY.set()
    try:
        outcomes = execute_task(Path(sweep_dir), task, pack, _WORKER_SIGNALS)
    finally:
        _BUSY.clear()
    if _orphaned():  # nobody to report to: the run checkpointed and released its locks (execute_task)
        os._exit(0)
    return outcomes


class _Stop(Exception):
    pass


@dataclass
class LocalRun:
    outcomes: list[Outcome]
    stopped_by: Optional[str] = None  # the signal that stopped the sweep early (runs in progress checkpointed)


def run_local(sweep_dir: Path, tasks: list[list[dict]], max_parallel: int, pack: bool,
              report: Callable[[Outcome], None], task_done: Callable[[], None] = lambda: None) -> LocalRun:
    """A pool of `max_parallel` worker processes (1: this process), each taking whole tasks.

    Ctrl-C (SIGINT), SIGTERM or SIGUSR1 stop the sweep gracefully: no new run starts, every run in progress
    stops at its next step with a checkpoint (a pack stops without one), and the same command resumes them. A
    second Ctrl-C stops at once (the runs resume from their last periodic checkpoint)."""
    import torch

    run = LocalRun([])
    # Threads per worker: the cores shared out, unless OMP_NUM_THREADS says otherwise (harness/core/threads.py).
    # Not less the load, as `harness train` does: the thread count changes the last bits of a run (the order of a
    # matmul's partial sums), and a sweep's results, the demo's tables among them, must not depend on what else
    # ran on the node that minute. The sweep's own workers are what keeps the node busy.
    workers = max(1, min(max_parallel, len(tasks)))
    choice = choose_threads(workers, load=0.0)
    print(f"sweep: {choice.describe()}", flush=True)
    threads = choice.threads or 0

    def collect(outcomes: list[Outcome]) -> None:
        for o in outcomes:
            report(o)
            run.outcomes.append(o)
        task_done()  # after the task's last outcome: one progress line per task, not per run of a pack

    if workers == 1:
        if threads:
            torch.set_num_threads(threads)
        signals = TaskSignals()

        def on_int(signum, frame):
            if signals.requested:
                raise KeyboardInterrupt
            run.stopped_by = run.stopped_by or "SIGINT"
            _say_stopping(run.stopped_by)
            os.kill(os.getpid(), signal.SIGUSR1)  # the trainer's stop request (harness/train/signals.py), or `signals`

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
        counter = ctx.Value("i", 0)
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(threads, pids, counter, os.getpid())) as pool:
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


def run_sweep(sweep, sweep_dir: Path, max_parallel: int, pack: Optional[bool], verbose: bool) -> int:
    """Run what is missing of a sweep in a pool of `max_parallel` workers here, with a progress bar and a summary."""
    from tqdm import tqdm

    started = time.time()
    entries = prepare(sweep, sweep_dir)
    st = status(entries, sweep_dir)
    tasks = group_tasks(st.missing, pack, sweep.spec.executor.pack_size, 1)
    packs = sum(len(t) > 1 for t in tasks)
    print(f"sweep {sweep.name}: {len(entries)} runs in {sweep_dir}: {len(st.finished)} finished, "
          f"{len(st.running)} running elsewhere, {len(st.missing)} to run"
          + (f", {len(st.queued)} queued in SLURM arrays" if st.queued else "")
          + (f" ({len(tasks)} tasks, {packs} of them packs) on {min(max_parallel, max(1, len(tasks)))} worker(s)" if tasks else ""),
          flush=True)
    if tasks:
        print(f"sweep: {describe_packing(st.missing, pack)}", flush=True)
    for e, holder in st.running[:3]:
        print(f"sweep: {e['name']} is held by {describe(holder)}")
    if not tasks:
        return 0
    counts: Counter = Counter()
    bar = tqdm(total=len(st.missing), unit="run", disable=None, dynamic_ncols=True)  # a bar on a terminal only
    lines = SweepProgress(sweep.name, [len(t) for t in tasks], min(max_parallel, len(tasks)), enabled=bar.disable)

    def report(o) -> None:
        counts[o.status] += 1
        lines.runs_done += 1
        if o.status not in ("finished-before", "locked"):
            bar.update(1)
        if verbose or o.status == "failed":
            value = f" {o.metric_name} {o.metric:.4g}" if o.metric is not None else ""
            tqdm.write(f"sweep: {o.name}: {o.status}{value}{(' ' + o.detail) if o.detail else ''}")

    try:
        local = run_local(sweep_dir, tasks, max_parallel, pack, report, lines.task_done)
    finally:
        bar.close()
    ran = counts[COMPLETED] + counts[DIVERGED] + counts["failed"] + counts[INTERRUPTED]
    print(f"sweep {sweep.name}: ran {ran} runs in {duration(time.time() - started)}: {counts[COMPLETED]} completed, "
          f"{counts[DIVERGED]} diverged, {counts['failed']} failed"
          + (f", {counts[INTERRUPTED]} interrupted" if counts[INTERRUPTED] else "")
          + (f"; skipped {counts['locked']} held by another executor" if counts["locked"] else "")
          + (f", {counts['finished-before']} finished meanwhile" if counts["finished-before"] else ""), flush=True)
    if counts["failed"]:
        raise SweepError(f"{counts['failed']} runs failed (see <run dir>/error.txt and {sweep_dir}/.sweep/history.jsonl); "
                         "fix the cause and run the same command again: it runs only what is missing or failed")
    if local.stopped_by:
        raise SweepStopped(f"sweep {sweep.name} stopped by {local.stopped_by}: {counts[INTERRUPTED]} runs interrupted, "
                           f"{len(st.missing) - len(local.outcomes)} not started; run the same command again: "
                           "interrupted runs resume from their checkpoint (packed runs start over)")
    return 0


class SweepProgress:
    """Off a terminal (no progress bar): a line after each finished task (runs_done counts the outcomes reported),
    runs done / tasks running / runs left and the ETA (the elapsed time per run done, times the runs left)."""

    def __init__(self, name: str, sizes: list[int], workers: int, enabled: bool):
        self.name, self.sizes, self.workers, self.enabled = name, sizes, max(1, workers), enabled
        self.tasks_done = self.runs_done = 0
        self.started = time.time()

    def task_done(self) -> None:
        self.tasks_done += 1
        if self.enabled:
            print(self.line(time.time() - self.started), flush=True)

    def line(self, elapsed: float) -> str:
        total = sum(self.sizes)
        left_tasks = max(0, len(self.sizes) - self.tasks_done)
        running = min(self.workers, left_tasks)
        eta = duration(elapsed / self.runs_done * (total - self.runs_done)) if self.runs_done else "?"
        return (f"sweep {self.name}: {self.runs_done}/{total} runs done, {running} task{'s' if running != 1 else ''} "
                f"running, {total - self.runs_done} left, ETA {eta}" if left_tasks else
                f"sweep {self.name}: {self.runs_done}/{total} runs done")


def duration(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s" if seconds >= 60 else f"{seconds:.1f}s"
