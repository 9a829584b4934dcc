"""Run-directory I/O: every file is written atomically (temp file, fsync, rename), so a crash or a
kill leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write) -> None:
    """Call `write(binary_file)` on a temp file beside `path`, fsync it, rename it over `path`, fsync the dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_torch(path: str | Path, obj: Any) -> None:
    """torch.save, atomically (a checkpoint is never half-written)."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


class RunLog:
    """metrics.jsonl (one JSON object per record) and TensorBoard events under tb/; rank 0 only.

    On resume from step s, records after s (logged before the interruption) are dropped from
    metrics.jsonl and purged from TensorBoard, so both read as one uninterrupted run.
    """

    # metrics key -> TensorBoard tag
    TAGS = {
        "train_loss": "train/loss", "train_accuracy": "train/accuracy", "lr": "train/lr",
        "effective_lr": "train/effective_lr", "temperature": "train/temperature",
        "examples_per_second": "train/examples_per_second", "grad_norm": "train/grad_norm",
        "param_norm": "train/param_norm", "update_norm": "train/update_norm",
    }

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _step_of(line) is not None and _step_of(line) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif not resume_step:
            self.path.unlink(missing_ok=True)
        self.file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key == "step" or not isinstance(value, (int, float)):
                    continue
                tag = self.TAGS.get(key) or (f"test/{key[5:]}" if key.startswith("test_") else key)
                self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
