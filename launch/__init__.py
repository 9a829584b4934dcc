"""Launch `harness train` at scale: torchrun (c10d rendezvous) or the deepspeed launcher, on one node, on
several, or across the nodes of a SLURM job. `python -m launch --help`; the logic is in launch/core.py."""

from launch.core import Layout, build_commands, resolve_layout  # noqa: F401
