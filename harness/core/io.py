"""Atomic file I/O for run directories, sweep state and datasets: every file is written atomically (temp file,
fsync, rename), so a crash or a kill leaves either the old file or the new one, never half of one.

Files and directories are created with the permissions any other tool gives them: 0666 / 0777 less the process
umask (and the directory's default ACL), so teammates sharing a project directory can read them. tempfile.mkstemp
and mkdtemp would create them 0600 / 0700 (private by design, for /tmp); the temp name is made here instead and
the kernel applies the umask at creation, as open(2) and mkdir(2) do for every other tool: no umask is read,
so there is no os.umask() round trip that another thread could race.
"""

from __future__ import annotations

import json
import os
import secrets
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
    fd, tmp = _create(path.parent, f".{path.name}.", ".tmp", lambda p: os.open(p, _NEW_FILE, 0o666))
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


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """A new directory `parent/PREFIX<random>`, 0777 less the umask (tempfile.mkdtemp makes it 0700)."""
    _, path = _create(Path(parent), prefix, "", lambda p: os.mkdir(p, 0o777))
    return Path(path)


# O_EXCL: never open a file someone else made; O_NOFOLLOW: nor a symlink planted under the name.
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _create(parent: Path, prefix: str, suffix: str, make) -> tuple[object, str]:
    """`make(name)` on a fresh random name in `parent` (what mkstemp does, less its 0600): (its result, the name)."""
    for _ in range(100):
        name = os.path.join(parent, f"{prefix}{secrets.token_hex(4)}{suffix}")
        try:
            return make(name), name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp name {prefix}*{suffix} in {parent}")


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
