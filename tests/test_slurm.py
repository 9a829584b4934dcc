"""The project's real sbatch scripts on a real SLURM cluster (tests/slurm_cluster.py: munged, slurmctld and
two slurmd on this machine, each node with 4 GPUs that CUDA cannot see), with CPU-sized overrides.

`sbatch --gpus-per-node=1` gives SLURM_GPUS_ON_NODE=1, so the launcher starts one process per node: the
runs below are world size 2 across node1 and node2, gloo on CPU.
"""

import json
import sys
import time

import pytest

from tests.conftest import ROOT, harness_env, run_harness

pytestmark = pytest.mark.slow

TINY = ["model.depth=10", "model.width=1", "batch.global_batch_size=128", "budget.epochs=null",
        "log.every_steps=1", "log.progress=false"]


def job_env(cluster) -> dict:
    """What the submitting shell would have: this worktree's harness, its Python, SLURM_CONF (sbatch exports it)."""
    return {**harness_env(HARNESS_PYTHON=sys.executable, OMP_NUM_THREADS=1), "SLURM_CONF": str(cluster.conf)}


def submit(cluster, script, *args, sbatch_args=()):
    return cluster.sbatch(ROOT / "slurm" / script, *map(str, args), sbatch_args=sbatch_args, env=job_env(cluster),
                          cwd=ROOT)


def test_cifar10_script_on_two_nodes(slurm_cluster, cifar_shards, tmp_path):
    """`sbatch --nodes=2 slurm/cifar10_wrn16_4.sh --set ... --run-dir DIR`: one world across both nodes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    job = submit(slurm_cluster, "cifar10_wrn16_4.sh", "--set", *TINY, f"data.path={cifar_shards}", "budget.steps=4",
                 "eval.every_epochs=null", "eval.every_steps=2", "--run-dir", run,
                 sbatch_args=["--nodes=2", "--gpus-per-node=1"])
    info = slurm_cluster.wait(job, timeout=900)
    out = slurm_cluster.output(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), out[-6000:]
    assert info["NumNodes"] == "2" and slurm_cluster.step_nodes(job) == {"node1", "node2"}  # a torchrun on each
    assert "2 node(s) x 1 process(es) (GPUs SLURM gave each node) = world size 2" in out
    assert "--rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:" in out and f"--rdzv-id={job} " in out

    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["steps"] == result["total_steps"] == 4
    assert result["layout"]["world_size"] == 2 and result["layout"]["micro_batch_size"] == 64
    for key in ("train_loss", "test_accuracy", "test_loss", "examples_per_second", "wall_seconds"):
        assert isinstance(result[key], float), key
    assert result["segments"][0]["job_id"] == job and result["segments"][0]["nnodes"] == "2"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "test_accuracy" in m] == [2, 4]

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert {"train/loss", "train/lr", "test/accuracy"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]


def test_usr1_to_the_batch_shell_stops_training_at_a_step(slurm_cluster, cifar_shards, tmp_path):
    """What `--signal=B:USR1@120` does two minutes before the time limit: the batch shell (exec'ed into the
    launcher) gets SIGUSR1, writes RUN_DIR/STOP, and every rank on both nodes stops at the next step with a
    checkpoint. (--no-requeue keeps this test to the forwarding: the trainer's requeue is refused.)"""
    run = tmp_path / "run"
    job = submit(slurm_cluster, "cifar10_wrn16_4.sh", "--set", *TINY, f"data.path={cifar_shards}",
                 "budget.steps=100000", "--run-dir", run, sbatch_args=["--nodes=2", "--gpus-per-node=1", "--no-requeue"])
    deadline = time.time() + 600
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip()):
        info = slurm_cluster.job(job)
        assert info["JobState"] in ("PENDING", "RUNNING"), slurm_cluster.output(job)[-6000:]
        assert time.time() < deadline, "training never started"
        time.sleep(0.5)
    slurm_cluster.signal(job, "USR1")  # scancel --signal=USR1 --batch: the batch shell only, as B: does
    info = slurm_cluster.wait(job, timeout=600)
    out = slurm_cluster.output(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), out[-6000:]
    assert "launch: SIGUSR1: wrote" in out and "stop requested (STOP file)" in out
    checkpoints = sorted((run / "checkpoints").glob("step-*.pt"))
    assert checkpoints and 0 < int(checkpoints[-1].stem[5:]) < 100000
    assert not (run / "result.json").exists() and not (run / "STOP").exists()


def test_imagenet_script_on_two_nodes(slurm_cluster, tmp_path):
    """slurm/imagenet_bs4096.sh end to end with tiny synthetic ImageNet-format shards and a tiny ResNet."""
    data = tmp_path / "imagenet"
    run_harness("data", "synth", "imagenet", data, "--train", 256, "--test", 128)
    run = tmp_path / "run"
    job = submit(slurm_cluster, "imagenet_bs4096.sh", "--set", "model.name=resnet", "model.depth=18", "model.width=8",
                 f"data.path={data}", "data.workers=1", "precision=fp32", "batch.global_batch_size=128", "budget.epochs=null",
                 "budget.steps=2", "log.every_steps=1", "log.progress=false", "--run-dir", run,
                 sbatch_args=["--nodes=2", "--gpus-per-node=1"])
    info = slurm_cluster.wait(job, timeout=900)
    out = slurm_cluster.output(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), out[-6000:]
    assert slurm_cluster.step_nodes(job) == {"node1", "node2"}
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["steps"] == 2 and result["layout"]["world_size"] == 2
    assert isinstance(result["test_accuracy"], float) and list((run / "tb").glob("events.out.tfevents.*"))


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_parameters(slurm_cluster, cifar_shards, tmp_path):
    """Issue 6 on the real cluster: SIGUSR1 to the batch shell (what --signal=B:USR1@120 sends before the time
    limit) -> checkpoint at the next step -> `scontrol requeue` -> the requeued job resumes -> completion, with
    final parameters equal to an uninterrupted run of the same config and world size (fp64)."""
    from tests.conftest import final_state, torchrun

    steps = 12
    overrides = [*TINY, "precision=fp64", f"data.path={cifar_shards}", f"budget.steps={steps}",
                 "checkpoint.every_minutes=null", "log.tensorboard=false"]
    reference = tmp_path / "reference"
    torchrun(2, "train", ROOT / "yaml" / "cifar10_wrn16_4.yaml", "--set", *overrides, "--run-dir", reference)

    run = tmp_path / "run"
    job = submit(slurm_cluster, "cifar10_wrn16_4.sh", "--set", *overrides, "--run-dir", run,
                 sbatch_args=["--nodes=2", "--gpus-per-node=1"])
    deadline = time.time() + 600
    while not ((run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert slurm_cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), slurm_cluster.output(job)[-6000:]
        assert time.time() < deadline, "training never started"
        time.sleep(0.5)
    slurm_cluster.signal(job, "USR1")
    info = slurm_cluster.wait(job, timeout=900)
    out = slurm_cluster.output(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), out[-6000:]
    assert int(info["Restarts"]) == 1, out[-6000:]
    assert "stop requested (STOP file)" in out, out[-6000:]
    assert f"requeue of SLURM job {job} accepted" in out or f"requeued SLURM job {job}" in out, out[-6000:]
    assert "SLURM_RESTART_COUNT=1" in out and "resumed from" in out

    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["steps"] == steps
    first, second = result["segments"]
    assert first["from_step"] == 0 and 0 < second["from_step"] < steps and second["restart_count"] == "1"
    ref, got = final_state(reference), final_state(run)
    assert all(torch_equal(ref[k], got[k]) for k in ref), "resumed parameters differ from the uninterrupted run"


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)
