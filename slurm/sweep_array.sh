#!/bin/bash
# One task of a sweep's SLURM job array. `harness sweep SPEC --executor slurm` writes a task file (task i = a
# list of runs) and submits this script as
#     sbatch --array=0-<T-1>%<P> [--time/--partition/--gpus-per-task from the spec] slurm/sweep_array.sh TASK_FILE
# (at most P tasks at once). Task i trains its list in ONE process: a pack of small runs as one batched model,
# or runs one after another, each into its own run directory, each under a lock (no run is trained twice).
# Runs of several GPUs or nodes each (spec `slurm: {nodes: N, gpus_per_node: G}`; sbatch then gets
# --nodes=N --ntasks=N --ntasks-per-node=1 --gpus-per-node=G) start one after another through
# `python -m launch` instead: srun + torchrun across the task's nodes, exactly as slurm/imagenet_bs4096.sh.
# Time limit or preemption: SIGUSR1 (120 s before) reaches python (exec below); the run in progress checkpoints
# (a launched run gets it forwarded), the task requeues itself (this task only) and resumes it; resubmitting
# `harness sweep` also runs whatever is still missing, resuming from checkpoints.
#SBATCH --job-name=harness-sweep
#SBATCH --ntasks=1
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-sweep-%A_%a.out
set -euo pipefail

TASK_FILE=${1:?usage: sbatch --array=0-N%P slurm/sweep_array.sh TASK_FILE  (harness sweep --executor slurm does this)}
: "${SLURM_ARRAY_TASK_ID:?this script runs as one task of a SLURM job array (sbatch --array=...)}"
# The submitting process's Python and checkout (harness sweep exports HARNESS_PYTHON and HARNESS_ROOT).
HARNESS_ROOT=${HARNESS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
PYTHON=${HARNESS_PYTHON:-$HARNESS_ROOT/.venv/bin/python}
if [[ ! -x $PYTHON ]]; then
    echo "slurm: error: no Python at $PYTHON; set HARNESS_PYTHON to a Python with the harness installed, or run make venv" >&2
    exit 5
fi
export PYTHONPATH="$HARNESS_ROOT${PYTHONPATH:+:$PYTHONPATH}"

echo "harness sweep: array task ${SLURM_ARRAY_TASK_ID} of job ${SLURM_ARRAY_JOB_ID:-?} on $(hostname) at $(date -Is): ${TASK_FILE}"
exec "$PYTHON" -m harness sweep-task "$TASK_FILE" "$SLURM_ARRAY_TASK_ID"
