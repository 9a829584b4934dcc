"""Where the repository is (the sweep executor starts `python -m launch` and `slurm/sweep_array.sh` from it,
the demo reads its specs from `yaml/`, and provenance asks git about it), and checks of user-given directories."""

from pathlib import Path

from harness.core.errors import FileSystemError

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def require_directory(path: Path, flag: str) -> None:
    """A directory the harness will create or reuse must not be an existing file (checked before any work)."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise FileSystemError(f"{flag} {path}: {existing} is an existing file, not a directory; give a directory "
                              "path (a new one is created, an existing one is resumed)")
