"""Atomic file I/O for run directories, sweep state and datasets: every file is written atomically (temp file,
fsync, rename), so a crash or a kill leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write) -> None:
    """Call `write(binary_file)` on a temp file beside `path`, fsync it, rename it over `path`, fsync the dir."""
    with names_path(path):
        _atomic_write(path, write)


def _atomic_write(path: str | Path, write) -> None:
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


@contextlib.contextmanager
def names_path(path: str | Path):
    """Give an OSError raised inside the path it was about: a write to an open file (ENOSPC from write() or
    fsync()) carries no file name, and a failed temp file or rename names the temp file, not the user's file.
    The CLI prints it as one line naming the path (harness.core.errors.os_error_message)."""
    try:
        yield
    except OSError as e:
        if e.filename is None or Path(str(e.filename)).name.startswith(f".{Path(path).name}."):
            e.filename, e.filename2 = str(path), None
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_torch(path: str | Path, obj: Any) -> None:
    """torch.save, atomically (a checkpoint is never half-written)."""
    import torch

    def save(f) -> None:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            # A failed write (ENOSPC) inside torch.save surfaces as a RuntimeError from its zip writer's cleanup
            # ("unexpected pos"), raised while handling the OSError: the OSError is what happened.
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise

    atomic_write(path, save)


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
