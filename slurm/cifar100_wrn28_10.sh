#!/bin/bash
# CIFAR-100, 28-10 Wide-ResNet with ghost batch norm (appendix, table 4): yaml/cifar100_wrn28_10.yaml.
#
#   sbatch [sbatch options] slurm/cifar100_wrn28_10.sh [harness train arguments]
#   sbatch --nodes=2 slurm/cifar100_wrn28_10.sh --set optim.effective_lr=16 --run-dir runs/c100-lr16
#
# Submit from the repository root (or set HARNESS_ROOT). Options for the launcher come from the environment:
#   HARNESS_PYTHON          Python with the harness installed (default: $HARNESS_ROOT/.venv/bin/python, made by `make venv`)
#   HARNESS_NPROC_PER_NODE  processes per node (default: the GPUs SLURM gave each node; 1 on a CPU-only node)
#   HARNESS_LAUNCHER        torchrun (default) or deepspeed (one node only)
#   HARNESS_MAX_RESTARTS    torchrun restarts after a worker dies (default 0)
#   HARNESS_DRY_RUN=1       print the srun/torchrun command instead of running it
# Check the layout first: harness plan yaml/cifar100_wrn28_10.yaml --world-size <nodes x GPUs per node>
#
#SBATCH --job-name=cifar100-wrn28-10
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# One task per node: torchrun forks one worker per GPU. --signal=B:USR1@120 reaches this shell, which `exec`
# turns into the launcher: it writes RUN_DIR/STOP, the run checkpoints at the next step and requeues itself
# (--requeue); the requeued job appends to the same log (--open-mode=append) and resumes.
set -euo pipefail
HARNESS_ROOT=${HARNESS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
PY=${HARNESS_PYTHON:-$HARNESS_ROOT/.venv/bin/python}
if [[ ! -x $PY ]]; then
    echo "slurm: error: no Python at $PY; set HARNESS_PYTHON to a Python with the harness installed, or run make venv" >&2
    exit 5
fi
export PYTHONPATH="$HARNESS_ROOT${PYTHONPATH:+:$PYTHONPATH}"
echo "slurm: job ${SLURM_JOB_ID:-none} on ${SLURM_JOB_NODELIST:-$(hostname)}, restart ${SLURM_RESTART_COUNT:-0}, $(date -Is)"
exec "$PY" -m launch "$HARNESS_ROOT/yaml/cifar100_wrn28_10.yaml" "$@"
