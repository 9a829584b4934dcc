"""Which batch size to buy: the boundary between the noise- and curvature-dominated regimes (sec. 3, 8), measured
three ways before a study spends its allocation.

- `harness probe CONFIG` (probe.py, regime.py): short runs on a log2 grid of eps_eff at a few B, as an ordinary
  sweep; the largest stable and the optimal rate at each B; the boundary where linear scaling meets the
  curvature plateau; B_simple measured online on one run (McCandlish et al. 2018); probe.json and probe.png.
- `harness probe --branch RUN_DIR[:STEP]` (branch.py): the critical batch size by branching from a checkpoint
  (Merrill et al. 2025); branch.json and branch.png.
It sits above harness.sweep and harness.analysis (it runs sweeps and reads their run directories) and below the
top-level CLI (harness/cli.py).
"""
