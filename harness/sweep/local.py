"""The local executor: a pool of worker processes on this machine, each taking whole tasks, stopped gracefully
by Ctrl-C, SIGTERM or SIGUSR1."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Optional

from harness.core.errors import SweepError, SweepStopped
from harness.core.status import COMPLETED, DIVERGED, INTERRUPTED
from harness.sweep.locks import describe
from harness.sweep.state import prepare, status
from harness.sweep.tasks import Outcome, TaskSignals, describe_packing, execute_task, group_tasks

_WORKER_SIGNALS: Optional[TaskSignals] = None


def _init_worker(threads: int, pids, counter) -> None:
    global _WORKER_SIGNALS
    import torch

    assign_device(counter, torch.cuda.device_count())
    if threads:
        torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops the workers
    _WORKER_SIGNALS = TaskSignals()  # SIGUSR1 from the parent: stop after the run in progress (checkpointed)
    _WORKER_SIGNALS.install()
    pids.put(os.getpid())


def assign_device(counter, devices: int) -> int:
    """Worker k of the pool trains on GPU k mod (visible GPUs): LOCAL_RANK, as a launched rank's (the trainer
    picks cuda:LOCAL_RANK). Without it every worker would train on cuda:0."""
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    os.environ["LOCAL_RANK"] = str(index % max(1, devices))
    return index


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
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads, pids, counter)) as pool:
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

    def report(o) -> None:
        counts[o.status] += 1
        if o.status not in ("finished-before", "locked"):
            bar.update(1)
        if verbose or o.status == "failed":
            value = f" {o.metric_name} {o.metric:.4g}" if o.metric is not None else ""
            tqdm.write(f"sweep: {o.name}: {o.status}{value}{(' ' + o.detail) if o.detail else ''}")

    try:
        local = run_local(sweep_dir, tasks, max_parallel, pack, report)
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


def duration(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s" if seconds >= 60 else f"{seconds:.1f}s"
