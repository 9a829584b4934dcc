"""Errors a user can fix. Each carries its own exit code and prints as one line (no traceback).

The CLI catches `HarnessError` and prints `harness: error: <message>`; `--debug` re-raises instead.
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
