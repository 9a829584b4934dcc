#!/bin/bash
# ImageNet, ResNet-50 (Goyal et al. 2017, the paper's table 2) at global batch 4096 over 4 nodes: yaml/imagenet_bs4096.yaml.
#
#   sbatch [sbatch options] slurm/imagenet_bs4096.sh [harness train arguments]
#   sbatch --nodes=8 slurm/imagenet_bs4096.sh --set optim.effective_lr=8 --run-dir runs/in-lr8
#
# Submit from the repository root (or set HARNESS_ROOT). Options for the launcher come from the environment:
#   HARNESS_PYTHON          Python with the harness installed (default: $HARNESS_ROOT/.venv/bin/python, made by `make venv`)
#   HARNESS_NPROC_PER_NODE  processes per node (default: the GPUs SLURM gave each node; 1 on a CPU-only node)
#   HARNESS_LAUNCHER        torchrun (default) or deepspeed (one node only)
#   HARNESS_MAX_RESTARTS    torchrun restarts after a worker dies (default 0)
#   HARNESS_DRY_RUN=1       print the srun/torchrun command instead of running it
# Check the layout first: harness plan yaml/imagenet_bs4096.yaml --world-size <nodes x GPUs per node>
#
#SBATCH --job-name=imagenet-bs4096
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
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
exec "$PY" -m launch "$HARNESS_ROOT/yaml/imagenet_bs4096.yaml" "$@"
