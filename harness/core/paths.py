"""Where the repository is: the sweep executor starts `python -m launch` and `slurm/sweep_array.sh` from it,
the demo reads its specs from `yaml/`, and provenance asks git about it."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
