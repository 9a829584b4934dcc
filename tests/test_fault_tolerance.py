"""No run lost to a signal, a dead rank, a broken checkpoint or a divergence (fp64 on CPU, tiny model)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, final_state, harness_env, max_abs_diff, run_harness, torchrun, write_config

CONFIG = """
seed: 5
precision: fp64
model: {{name: wrn, depth: 10, width: 1}}
data: {{name: cifar10, path: {shards}}}
batch: {{global_batch_size: 128}}
optim: {{name: momentum, effective_lr: 1.0}}
budget: {{steps: {steps}}}
checkpoint: {{every_steps: {every}, every_minutes: null, keep: 3}}
log: {{every_steps: 1, progress: false, tensorboard: false}}
"""


def config(tmp_path, shards, steps=12, every=2, name="ft.yaml"):
    return write_config(tmp_path / name, CONFIG.format(shards=shards, steps=steps, every=every))


def bitwise_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def wait_for(predicate, timeout=300, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])["step"] if lines else 0


def children(pid: int) -> list[int]:
    """Direct child processes of `pid`, from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cifar_shards):
    """The uninterrupted single-process run every interrupted one must reproduce."""
    tmp = tmp_path_factory.mktemp("ref")
    run = tmp / "run"
    run_harness("train", config(tmp, cifar_shards), "--run-dir", run)
    return final_state(run)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_is_bitwise(tmp_path, cifar_shards, reference):
    """SIGTERM mid-run inside a (fake) SLURM array task without scontrol: checkpoint, say so, exit 0; resume."""
    cfg, run = config(tmp_path, cifar_shards), tmp_path / "run"
    env = harness_env(SLURM_JOB_ID=4242, SLURM_ARRAY_JOB_ID=4240, SLURM_ARRAY_TASK_ID=2, SLURM_RESTART_COUNT=0,
                      PATH="/nonexistent")  # no scontrol here, as in many containers (Lightning #21404)
    proc = subprocess.Popen([sys.executable, "-m", "harness", "train", cfg, "--run-dir", run], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: logged_step(run) >= 3 or proc.poll() is not None, what="step 3")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "stop requested (SIGTERM)" in out and "SLURM_RESTART_COUNT=0" in out
    assert "cannot requeue SLURM job 4240_2" in out  # the array task, never the whole array
    assert not (run / "result.json").exists()
    saved = sorted(p.name for p in (run / "checkpoints").glob("step-*.pt"))
    assert saved and int(saved[-1][5:13]) < 12
    resumed = run_harness("train", cfg, "--run-dir", run)
    assert f"resumed from {run / 'checkpoints' / saved[-1]}" in resumed.stdout
    assert not (run / "STOP").exists()
    assert bitwise_equal(final_state(run), reference)
    result = json.loads((run / "result.json").read_text())
    assert [s["from_step"] for s in result["segments"]] == [0, int(saved[-1][5:13])]


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back(tmp_path, cifar_shards, reference):
    cfg, run = config(tmp_path, cifar_shards), tmp_path / "run"
    run_harness("train", cfg, "--run-dir", run)
    ckpts = sorted((run / "checkpoints").glob("step-*.pt"))
    assert [p.name for p in ckpts] == ["step-00000006.pt", "step-00000008.pt", "step-00000010.pt"]  # keep 3
    # Pretend the job died while the newest checkpoint was being copied, and before the end.
    (run / "result.json").unlink()
    (run / "checkpoints" / "final.pt").unlink()
    data = ckpts[-1].read_bytes()
    ckpts[-1].write_bytes(data[: len(data) // 2])
    proc = run_harness("train", cfg, "--run-dir", run)
    assert "step-00000010.pt is unreadable" in proc.stderr and "falling back" in proc.stderr
    assert "resumed from" in proc.stdout and "step-00000008.pt (step 8 of 12)" in proc.stdout
    assert bitwise_equal(final_state(run), reference)


@pytest.mark.slow
def test_resume_on_another_world_size(tmp_path, cifar_shards, reference):
    """Checkpoint at W = 2, resume at W = 1 (requeued onto fewer nodes): the same trajectory."""
    cfg, run = config(tmp_path, cifar_shards, every=6), tmp_path / "run"
    torchrun(2, "train", cfg, "--run-dir", run)
    # Keep only the step-6 checkpoint, as if the W = 2 job had been stopped there.
    (run / "result.json").unlink()
    (run / "checkpoints" / "final.pt").unlink()
    proc = run_harness("train", cfg, "--run-dir", run)
    assert "(step 6 of 12)" in proc.stdout
    result = json.loads((run / "result.json").read_text())
    assert [s["world_size"] for s in result["segments"]] == [2, 1]
    assert max_abs_diff(final_state(run), reference) < 1e-10


@pytest.mark.slow
def test_killed_rank_restarts_group_and_resumes_bitwise(tmp_path, cifar_shards):
    """kill -9 of one rank under torchrun --max-restarts=1: the group restarts from the last checkpoint and ends
    bitwise equal to an uninterrupted run at the same layout."""
    cfg = config(tmp_path, cifar_shards)
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    torchrun(2, "train", cfg, "--run-dir", ref_run)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "-m", "harness", "train", str(cfg), "--run-dir", str(run)]
    proc = subprocess.Popen(cmd, env=harness_env(OMP_NUM_THREADS=1), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run / "checkpoints" / "step-00000004.pt").exists() or proc.poll() is not None, what="step 4")
    workers = sorted(children(proc.pid))
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    assert "resumed from" in out
    assert json.loads((run / "result.json").read_text())["status"] == "completed"
    assert bitwise_equal(final_state(run), final_state(ref_run))


DIVERGE = """
model: {{name: mlp, hidden: [32]}}
data: {{name: digits, path: {shards}}}
batch: {{global_batch_size: 64}}
optim: {{name: momentum, effective_lr: {lr}}}
budget: {{steps: 40}}
log: {{every_steps: 5, progress: false, tensorboard: false}}
{extra}
"""


@pytest.mark.parametrize("lr, extra, at_most", [(1.0e6, "", 40), (0.1, "divergence: {max_loss: 0.5}", 1)])
def test_divergence_is_recorded_not_crashed(tmp_path, digits_shards, lr, extra, at_most):
    cfg = write_config(tmp_path / "d.yaml", DIVERGE.format(shards=digits_shards, lr=lr, extra=extra))
    proc = run_harness("train", cfg, "--run-dir", tmp_path / "run")  # exit 0: a sweep goes on
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "diverged" and "diverged" in proc.stdout
    assert 1 <= result["diverged_at_step"] <= at_most and result["test_accuracy"] is None
    again = run_harness("train", cfg, "--run-dir", tmp_path / "run")  # finished: not retried
    assert "already finished (status diverged)" in again.stdout
