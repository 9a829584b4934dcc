"""Run locks: two executors on one sweep never train the same run at the same time.

A lock is a file holding the holder's host, pid, start time and SLURM job. It is written in full to a private
temporary file and then published with link(2), which is atomic and fails if the lock exists (on local file
systems, NFS, Lustre and GPFS alike), so a lock is never seen empty or half-written, even when its writer is
killed mid-write; where hard links are not supported it falls back to O_CREAT | O_EXCL. The holder touches it every `heartbeat` seconds. A lock is
stale, and may be broken, when its holder is on this host and its pid is gone (or a zombie, or reused by a
process started after the lock was written), or when its heartbeat is older than `stale_after` seconds (a holder
on another node that crashed or was killed). Breaking is serialized by a
second O_EXCL file (`.break`), so of several executors that find the same stale lock exactly one takes it.

These locks cover a run from the sweep's side (`sweep` and `status` can see who holds which run without opening
run directories); the run directory itself is held by whoever trains it (harness/core/lockfile.py, the same
holder record and `describe`).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from harness.core.lockfile import describe, holder_info

HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 300.0
BREAK_STALE_SECONDS = 60.0  # a `.break` file older than this belongs to a breaker that died mid-break


PID_REUSE_MARGIN_SECONDS = 60.0  # clock steps and tick rounding; a pid reused sooner is caught by the heartbeat


def _proc_start(pid: int) -> tuple[str, float] | None:
    """(state, start time in epoch seconds) of a Linux process from /proc, or None where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 (state) onwards
        return fields[0], boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _pid_alive(pid: int, since: float | None = None) -> bool:
    """Whether the process `pid` that took a lock at `since` still runs: not gone, not a zombie, not a newer
    process that reused the pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    proc = _proc_start(pid)
    if proc is None:
        return True
    state, started = proc
    if state in ("Z", "X"):  # killed, not yet reaped (its parent died too, and PID 1 does not reap)
        return False
    return not (isinstance(since, (int, float)) and started > since + PID_REUSE_MARGIN_SECONDS)


def read_lock(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text() or "{}")
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # being written right now, or torn by a crash: judged by its age only


def is_stale(path: Path, info: dict | None, stale_after: float) -> bool:
    try:
        age = time.time() - Path(path).stat().st_mtime
    except FileNotFoundError:
        return False  # gone: not stale, simply free
    if info and info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        if not _pid_alive(info["pid"], info.get("since")):
            return True
    return age > stale_after  # no heartbeat for that long: a holder elsewhere died (or this pid was reused)


class RunLocks:
    """The locks of one process in one lock directory, kept fresh by a heartbeat thread."""

    def __init__(self, directory: Path, stale_after: float = STALE_AFTER_SECONDS, heartbeat: float = HEARTBEAT_SECONDS):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self.held: set[str] = set()
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def path(self, run_id: str) -> Path:
        return self.directory / f"{run_id}.lock"

    def acquire(self, run_id: str) -> tuple[bool, dict | None]:
        """(True, None) if this process now holds the run; else (False, the holder's info)."""
        path = self.path(run_id)
        for _ in range(3):
            if self._create(path):
                with self._mutex:
                    self.held.add(run_id)
                self._start_heartbeat()
                return True, None
            info = read_lock(path)
            if not is_stale(path, info, self.stale_after):
                if info is None:
                    continue  # released between our attempt and the read: try again
                return False, info
            self._break(path, info)
        return False, read_lock(path)

    def _create(self, path: Path) -> bool:
        """Publish a complete lock file at `path` atomically; False if one is there already."""
        tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w") as f:
            json.dump(holder_info(), f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: O_EXCL, which a kill mid-write can leave empty
            return self._create_exclusive(path)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _create_exclusive(path: Path) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(holder_info(), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _break(self, path: Path, seen: dict | None) -> None:
        """Remove a stale lock, unless someone else broke (and maybe retook) it first."""
        guard = path.with_name(path.name + ".break")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > BREAK_STALE_SECONDS:
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            return
        os.close(fd)
        try:
            # Under the guard: remove only the lock we judged stale (a fresh one is someone's live lock).
            if read_lock(path) == seen and is_stale(path, seen, self.stale_after):
                path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def release(self, run_id: str) -> None:
        with self._mutex:
            if run_id not in self.held:
                return
            self.held.discard(run_id)
        self.path(run_id).unlink(missing_ok=True)

    def release_all(self) -> None:
        for run_id in list(self.held):
            self.release(run_id)
        self._stop.set()

    def _start_heartbeat(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with self._mutex:
                held = list(self.held)
            for run_id in held:
                try:
                    os.utime(self.path(run_id))
                except FileNotFoundError:
                    pass
