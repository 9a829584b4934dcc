"""How many intra-op threads each training process on this node uses: one rule for `harness train` and the
sweep's workers.

torch starts one OpenMP thread per core it sees. On a node that other processes keep busy, those threads wait
on each other at every parallel region (an OpenMP barrier is as slow as its slowest thread), and a small model
runs 30-130x slower than on one thread (the digits MLP on a loaded 2-core node: 456 examples/s on 2 threads,
15,408 on 1). So a process gets its share of the cores that are free: the cores this process may run on
(a SLURM or cgroup cpuset, not the whole machine), less the 1-minute load average of what already runs there,
divided among the processes about to start. OMP_NUM_THREADS, when set, wins (torch reads it itself).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ThreadChoice:
    threads: Optional[int]  # what to pass to torch.set_num_threads; None: OMP_NUM_THREADS decides
    reason: str

    def describe(self) -> str:
        return f"{self.reason}; set OMP_NUM_THREADS to choose" if self.threads else self.reason


def usable_cores() -> int:
    """The cores this process may run on (sched_getaffinity: the job's cpuset under SLURM)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def choose_threads(processes: int, cores: Optional[int] = None, load: Optional[float] = None) -> ThreadChoice:
    """The intra-op threads of each of `processes` processes about to start on this node."""
    if os.environ.get("OMP_NUM_THREADS"):
        n = os.environ["OMP_NUM_THREADS"]
        return ThreadChoice(None, f"{n} intra-op thread{'' if n == '1' else 's'} per process (OMP_NUM_THREADS)")
    cores = usable_cores() if cores is None else cores
    load = load_average() if load is None else load
    free = max(1, min(cores, cores - int(load)))  # int(): a load of 0.3 is an idle node
    threads = max(1, free // max(1, processes))
    busy = f", load {load:.1f} from other processes" if int(load) else ""
    share = f" shared by {processes} processes" if processes > 1 else ""
    return ThreadChoice(threads, f"{threads} intra-op thread{'s' if threads > 1 else ''} per process "
                                 f"({cores} usable cores{busy}{share})")


def apply(choice: ThreadChoice) -> None:
    if choice.threads:
        import torch

        torch.set_num_threads(choice.threads)
