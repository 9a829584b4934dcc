"""Atomic file I/O for run directories, sweep state and datasets: every file is written atomically (temp file,
fsync, rename), so a crash or a kill leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


class names_path:
    """`with names_path(path):` gives an OSError raised inside the path it was about: a write to an open file
    (ENOSPC from write() or fsync()) carries no file name, and a failed temp file or rename names the temp file,
    not the user's file. The CLI prints it as one line naming the path (harness.core.errors.os_error_message)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        if isinstance(error, OSError) and (
                error.filename is None or Path(str(error.filename)).name.startswith(f".{self.path.name}.")):
            error.filename, error.filename2 = str(self.path), None
        return False


def _naming_its_path(write_file):
    """Decorate `write_file(path, ...)` so that its OSErrors name `path` (names_path)."""
    def wrapper(path: str | Path, *args, **kwargs):
        with names_path(path):
            return write_file(path, *args, **kwargs)
    wrapper.__doc__, wrapper.__name__ = write_file.__doc__, write_file.__name__
    return wrapper


@_naming_its_path
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
