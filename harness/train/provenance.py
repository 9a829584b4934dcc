"""What a run directory records about where and with what code it ran, so that any number in a table can be
traced to the code, libraries, host and layout that produced it."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata

from harness.core import __version__
from harness.core.memory import keep_freed_memory
from harness.core.paths import REPO_ROOT

SLURM_KEYS = {
    "job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID", "array_task_id": "SLURM_ARRAY_TASK_ID",
    "restart_count": "SLURM_RESTART_COUNT", "nodelist": "SLURM_JOB_NODELIST", "nnodes": "SLURM_NNODES",
}


def slurm_info() -> dict:
    return {key: os.environ[var] for key, var in SLURM_KEYS.items() if var in os.environ}


def code_version() -> dict:
    root = REPO_ROOT
    info = {"harness": __version__}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5)
            info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(env, plan) -> dict:
    import torch

    return {
        "code": code_version(),
        "python": sys.version.split()[0],
        "packages": {p: _version(p) for p in ("torch", "torchvision", "deepspeed", "webdataset", "tensorboard", "numpy")},
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "device": str(env.device),
        "device_name": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else platform.processor(),
        "world_size": env.world_size,
        "local_rank": env.local_rank,
        "layout": plan.as_dict(),
        "intra_op_threads": torch.get_num_threads(),  # the reduction order of CPU kernels, hence a run's last bits
        "malloc": keep_freed_memory(),  # harness/core/memory.py (where tensors live, not what is computed)
        "slurm": slurm_info(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
