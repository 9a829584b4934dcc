"""One writer per run directory: an exclusive flock(2) on `<run dir>/.lock`, held for the life of the writer.

Two `harness train` processes on one run directory would both append to metrics.jsonl and TensorBoard, and the
first one's events would end up in a file the second replaced. The second writer is refused instead
(RunDirInUse, exit 9), naming the holder from what the lock file says (host, pid, since, SLURM job).

Why flock and not a lock file that exists while held (harness/sweep/locks.py does that, for the sweep's own
bookkeeping): the kernel drops a flock when its process exits or is killed, so a SIGKILLed or OOM-killed
writer never leaves a stale lock behind, and nothing has to judge staleness by pids or heartbeats. On NFS
(Linux >= 2.6.12) flock is carried by the server's byte-range locks and so holds across nodes; a crashed node's
lock goes when its lease expires (NFSv4: 90 s by default), which is why a writer of the same SLURM job or
torchrun run (a requeue, an elastic restart) waits that long for it. Lustre mounted without `-o flock` refuses
flock (ENOSYS): the run goes on unlocked, with one warning line.

The lock file is never unlinked: a writer that unlinked it could let a third process lock a new file while a
second still holds the old one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from harness.core.errors import RunDirInUse

LOCK_NAME = ".lock"
SAME_JOB_WAIT_SECONDS = 120.0  # a requeued job / restarted worker waits out its predecessor (NFSv4 lease: 90 s)
_UNSUPPORTED = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)


def holder_info() -> dict:
    """Who holds a lock: host, pid, start time, and the SLURM job and torchrun run it belongs to."""
    info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    for key, var in (("slurm_job", "SLURM_JOB_ID"), ("slurm_array_task", "SLURM_ARRAY_TASK_ID"),
                     ("torchelastic_run", "TORCHELASTIC_RUN_ID")):
        if var in os.environ:
            info[key] = os.environ[var]
    return info


def describe(info: dict | None) -> str:
    if not info:
        return "an unknown holder"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    job = f", SLURM job {info['slurm_job']}" if "slurm_job" in info else ""
    return f"pid {info.get('pid')} on {info.get('host')} since {since}{job}"


def _same_job(info: dict | None) -> bool:
    """Whether the holder belongs to this SLURM job or torchrun run (so it is a predecessor that is dying)."""
    mine = holder_info()
    return bool(info) and any(key in mine and info.get(key) == mine[key] for key in ("slurm_job", "torchelastic_run"))


class RunDirLock:
    """The exclusive lock of one run directory; `acquire` takes it or raises RunDirInUse, `release` drops it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides, as for every file the harness writes
        try:
            if not self._lock(fd):
                os.close(fd)
                return
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder_info()).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _lock(self, fd: int) -> bool:
        """True: locked; False: this file system has no flock (the run goes on unlocked); else RunDirInUse."""
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                info = read(self.path)
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                print(f"harness: warning: {self.path.parent} is on a file system without flock ({e.strerror}): "
                      "nothing stops a second writer on this run directory (Lustre: mount with -o flock)",
                      file=sys.stderr)
                return False
            if deadline is None:
                deadline = time.monotonic() + (SAME_JOB_WAIT_SECONDS if _same_job(info) else 0.0)
            if time.monotonic() >= deadline:
                raise RunDirInUse(f"run dir {self.path.parent} is in use by {describe(info)}: another process is "
                                  "training it; wait for it to end (or stop it: touch STOP in the run dir), or use "
                                  "another --run-dir")
            time.sleep(1.0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def read(path: Path) -> dict | None:
    """What a lock file says about its holder (None: nothing readable, e.g. being rewritten right now)."""
    try:
        return json.loads(Path(path).read_text() or "null")
    except (OSError, ValueError):
        return None
