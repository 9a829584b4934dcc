"""Sweeps: specs and grids, the sweep directory's state, tasks, locks, the local and SLURM executors, TensorBoard
HParams and the `harness sweep` command. Imports core, recipe and train (never analysis)."""
