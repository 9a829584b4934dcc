"""Errors a user can fix. Each carries its own exit code and prints as one line (no traceback).

The CLI catches `HarnessError` and prints `harness: error: <message>`, and an OSError as one line naming the path
and the errno (exit 8, os_error_message); `--debug` prints the traceback too and keeps the exit code.
Distinct exit codes let a sweep or a SLURM script tell a typo from a crash (exit 1 is an unexpected bug).
"""


class HarnessError(Exception):
    exit_code = 1


class ConfigError(HarnessError):
    """A config key, value or file is wrong."""

    exit_code = 2


class PlanError(HarnessError):
    """The batch layout (global batch, world size, micro-batch, ghost groups) is impossible."""

    exit_code = 3


class DataError(HarnessError):
    """A dataset path, shard or manifest is missing, corrupt or inconsistent."""

    exit_code = 4


class LaunchError(HarnessError):
    """The launch environment (SLURM, torchrun, DeepSpeed) cannot be worked out."""

    exit_code = 5


class CheckpointError(HarnessError):
    """No usable checkpoint where one is required."""

    exit_code = 6


class SweepError(HarnessError):
    """Runs of a sweep failed, or a sweep directory cannot be analyzed."""

    exit_code = 7


class SweepStopped(SweepError):
    """A sweep stopped early by Ctrl-C or a signal; its runs in progress checkpointed (exit 130, as for Ctrl-C)."""

    exit_code = 130


class FileSystemError(HarnessError):
    """The file system refused a read or write (full, read-only, no permission, a file where a directory goes)."""

    exit_code = 8


# errno -> what to do about it. The errno's own meaning comes from os.strerror (the C library's text).
_OS_FIXES = {
    "ENOSPC": "free space or choose another --run-dir",
    "EDQUOT": "free space within your quota (or ask for a larger one) or choose another --run-dir",
    "EFBIG": "the file is larger than this file system allows; choose another --run-dir",
    "EROFS": "the file system is mounted read-only; choose a writable --run-dir",
    "EACCES": "check its permissions (ls -ld) or choose another path",
    "EPERM": "check its permissions (ls -ld) or choose another path",
    "EISDIR": "a directory is where a file should be; move it aside",
    "ENOTDIR": "a file is where a directory should be; move it aside or choose another path",
    "EEXIST": "something is already there; move it aside or choose another path",
    "ENOENT": "check the path (a directory was moved or deleted while the harness ran?)",
    "ENAMETOOLONG": "choose a shorter path",
    "EMFILE": "too many open files: raise the limit (ulimit -n) or use fewer data loader workers",
    "ENFILE": "too many open files on the system: raise the limit or use fewer data loader workers",
    "EIO": "the storage reported an I/O error; check the disk or file system and choose another path",
    "ESTALE": "the network file system lost the file; rerun (the run resumes from its last checkpoint)",
}
_WRITE_ERRNOS = {"ENOSPC", "EDQUOT", "EFBIG", "EROFS"}
_NETWORK_ERRNOS = {"ECONNREFUSED", "ECONNRESET", "ECONNABORTED", "ETIMEDOUT", "EHOSTUNREACH", "ENETUNREACH",
                   "EADDRINUSE", "EADDRNOTAVAIL"}


def os_error_message(e: OSError) -> str:
    """One line for an OSError: the path, the errno's meaning and name, and the fix (exit code 8).

    `harness: error: cannot write /x/y: No space left on device (ENOSPC); free space or choose another --run-dir`
    """
    import errno
    import os

    name = errno.errorcode.get(e.errno, "") if e.errno is not None else ""
    meaning = os.strerror(e.errno) if e.errno is not None else (str(e) or type(e).__name__)
    code = f" ({name})" if name else ""
    if name == "EPIPE":
        return f"cannot write the output: {meaning}{code}; the program reading it (| head?) stopped early"
    if isinstance(e, ConnectionError) or name in _NETWORK_ERRNOS:
        return (f"cannot connect: {meaning}{code}; check that the address is reachable (under torchrun: "
                "--rdzv-endpoint / MASTER_ADDR:MASTER_PORT)")
    path = e.filename if e.filename is not None else "a file"
    if e.filename2 is not None:
        path = f"{path} -> {e.filename2}"
    verb = "cannot write" if name in _WRITE_ERRNOS else "cannot use"
    fix = _OS_FIXES.get(name, "check the path and the file system")
    return f"{verb} {path}: {meaning}{code}; {fix}"


class RunDirInUse(HarnessError):
    """Another live process is training into this run directory (harness/core/lockfile.py)."""

    exit_code = 9


class PeerLost(LaunchError):
    """A rank stopped making progress (frozen, stopped or lost): a collective timed out (exit 5, as a launch
    fault: the job's processes, not its config, are what went wrong)."""


class Interrupted(HarnessError):
    """Ctrl-C: the run checkpointed at a step boundary and stopped (exit 130, the shell's code for SIGINT).
    Printed as `harness: <message>`: it is not an error."""

    exit_code = 130
