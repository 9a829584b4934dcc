"""SLURM's limits on one submission, and the job arrays a sweep's tasks are split into to stay within them.

- MaxArraySize (slurm.conf; `scontrol show config`): array indices run 0 .. MaxArraySize-1, 0 disables arrays,
  default 1001 (slurm.conf(5); SLURM's job_array.html). `SchedulerParameters=max_array_tasks=N` caps the tasks of
  one array below that. sbatch refuses a larger `--array` with "Invalid job array specification".
- MaxSubmitJobs / GrpSubmitJobs of the user's associations, and MaxSubmitJobsPerUser / GrpSubmitJobs of a QOS the
  spec names (`--qos=` in slurm.extra_args): jobs pending or running at once (sacctmgr(1)), each array task
  counting as one job (rslurm#73: a 6050-task array refused under MaxSubmitJobs 5000). Read from slurmctld's own
  cache, `scontrol -o show assoc_mgr` (`Limit(in use)` pairs, `N` for none), which needs no slurmdbd query; a
  per-user QOS limit counts the user's jobs in `squeue -r`. Without accounting the cache is empty: no such limit.

Without a working `scontrol` nothing is known and a sweep is submitted as one array, as before (and says so).
"""

from __future__ import annotations

import getpass
import math
import re
import subprocess
from dataclasses import dataclass, field
from typing import Optional

from harness.core.errors import SweepError

DEFAULT_MAX_ARRAY_SIZE = 1001  # slurm.conf(5)


@dataclass
class Limits:
    max_array_tasks: Optional[int] = None  # tasks one array may hold (indices 0..n-1); None: unknown
    array_source: str = ""  # e.g. "MaxArraySize = 1001"
    submit_room: Optional[int] = None  # array tasks the user may still submit; None: no limit seen
    submit_source: str = ""  # e.g. "MaxSubmitJobs=500 of the association of user u (20 in use)"
    notes: list[str] = field(default_factory=list)  # what could not be read, and why

    @property
    def known(self) -> bool:
        return self.max_array_tasks is not None


def _run(cmd: list[str]) -> tuple[Optional[str], str]:
    """(stdout, "") or (None, why it failed)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return None, f"{cmd[0]} not found"
    except subprocess.TimeoutExpired:
        return None, f"`{' '.join(cmd)}` timed out"
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()
        return None, f"`{' '.join(cmd)}` failed: {why[-1] if why else f'exit {proc.returncode}'}"
    return proc.stdout, ""


def parse_config(text: str) -> dict[str, str]:
    """`scontrol show config` as {key: value}."""
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s*(\w+)\s*=\s*(.*)$", text, re.M)}


def array_limit(config: dict[str, str]) -> tuple[int, str]:
    """(tasks one array may hold, where that comes from) from `scontrol show config`."""
    size = int(config.get("MaxArraySize", DEFAULT_MAX_ARRAY_SIZE))
    found = re.search(r"max_array_tasks=(\d+)", config.get("SchedulerParameters", ""))
    if found and int(found.group(1)) < size:
        return int(found.group(1)), f"SchedulerParameters max_array_tasks={found.group(1)} (MaxArraySize = {size})"
    return size, f"MaxArraySize = {size}"


def parse_assoc_mgr(text: str, keys: tuple[str, ...]) -> list[tuple[str, int, Optional[int], str]]:
    """(key, limit, in use or None, record) for every set limit among `keys` in `scontrol -o show assoc_mgr`
    records (one per line, `Key=Limit(InUse)`, `N` for no limit)."""
    out = []
    for line in text.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        record = (f"QOS {fields['QOS'].split('(')[0]}" if "QOS" in fields and "ClusterName" not in fields
                  else f"association of account {fields.get('Account', '?')}"
                  + (f", user {fields['UserName'].split('(')[0]}" if fields.get("UserName") else ""))
        for key in keys:
            found = re.fullmatch(r"(\d+)(?:\((\d+)\))?", fields.get(key, ""))
            if found:
                out.append((key, int(found.group(1)), int(found.group(2)) if found.group(2) else None, record))
    return out


def submit_room(user: str, qos: Optional[str]) -> tuple[Optional[int], str, list[str]]:
    """The smallest headroom among the submit limits slurmctld enforces on this user, with its source."""
    notes, found = [], []
    text, why = _run(["scontrol", "-o", "show", "assoc_mgr", f"users={user}", "flags=assoc"])
    if text is None:
        notes.append(f"association limits not read ({why})")
    else:
        found += parse_assoc_mgr(text, ("MaxSubmitJobs", "GrpSubmitJobs"))
    if qos:
        text, why = _run(["scontrol", "-o", "show", "assoc_mgr", f"qos={qos}", "flags=qos"])
        if text is None:
            notes.append(f"limits of QOS {qos} not read ({why})")
        else:
            found += parse_assoc_mgr(text, ("MaxSubmitJobsPU", "MaxSubmitJobsPerUser", "GrpSubmitJobs"))
    best: tuple[Optional[int], str] = (None, "")
    for key, limit, used, record in found:
        if used is None:  # a per-user QOS limit: count this user's jobs, one line per array task
            queue, why = _run(["squeue", "-h", "-r", "-u", user, "-o", "%i"])
            used = len(queue.split()) if queue is not None else 0
        room = max(0, limit - used)
        if best[0] is None or room < best[0]:
            best = (room, f"{key}={limit} of the {record} ({used} in use)")
    return best[0], best[1], notes


def read_limits(extra_args: list[str] = ()) -> Limits:
    """What this cluster allows one submission of the current user; nothing known without scontrol."""
    text, why = _run(["scontrol", "show", "config"])
    if text is None:
        return Limits(notes=[why])
    tasks, source = array_limit(parse_config(text))
    qos = next((a.split("=", 1)[1] for a in extra_args if a.startswith("--qos=")), None)
    room, room_source, notes = submit_room(getpass.getuser(), qos)
    return Limits(tasks, source, room, room_source, notes)


def plan_arrays(n_tasks: int, limits: Limits) -> list[range]:
    """The task indices of each array: as few arrays as MaxArraySize allows, all within the submit limit."""
    if limits.max_array_tasks is None:
        return [range(n_tasks)]  # today's behaviour: one array
    if limits.max_array_tasks < 1:
        raise SweepError(f"this cluster takes no job arrays ({limits.array_source}); run the sweep with "
                         "--executor local inside an allocation (salloc), or ask the admins for MaxArraySize > 0")
    if limits.submit_room is not None and n_tasks > limits.submit_room:
        raise SweepError(f"{n_tasks} array tasks exceed what may still be submitted, {limits.submit_room} "
                         f"({limits.submit_source}); put more runs in each task (spec slurm.runs_per_task: "
                         f"{math.ceil(n_tasks / max(limits.submit_room, 1))}, or packing), or wait for queued jobs "
                         "to end and run the same command again (it submits only what is missing)")
    size = limits.max_array_tasks
    return [range(start, min(start + size, n_tasks)) for start in range(0, n_tasks, size)]


def describe_arrays(arrays: list[range], limits: Limits, max_parallel: int) -> str:
    """Why the tasks go into this many arrays, for --dry-run and the submission log."""
    n = sum(len(a) for a in arrays)
    if not limits.known:
        return (f"1 array of {n} tasks, as without limits: SLURM's limits are unknown ({'; '.join(limits.notes)}); "
                f"sbatch refuses an array beyond the cluster's MaxArraySize (default {DEFAULT_MAX_ARRAY_SIZE})")
    room = (f"; {limits.submit_room} more jobs allowed ({limits.submit_source})" if limits.submit_room is not None
            else "; no submit limit seen" + (f" ({'; '.join(limits.notes)})" if limits.notes else
                                             " (slurmctld caches no MaxSubmitJobs for this user)"))
    if len(arrays) == 1:
        return f"1 array of {n} tasks ({limits.array_source}: up to {limits.max_array_tasks} tasks per array{room})"
    sizes = ", ".join(str(len(a)) for a in arrays)
    return (f"{len(arrays)} arrays of {sizes} tasks ({limits.array_source}: at most {limits.max_array_tasks} tasks "
            f"per array{room}); each starts when the one before has ended (--dependency=afterany), so at most "
            f"{max_parallel} tasks run at once")
