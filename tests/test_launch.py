"""Multi-process launches through `python -m launch` and the real launchers (gloo on CPU), and TensorBoard.

One config (WRN-10-1 with ghost BN over 16, fp32, B = 64 as 16 micro x 2 accum x 2 ranks, 8 steps, digits):
- two nodes without SLURM: two launchers, each `torchrun --nnodes 2 --nproc-per-node 1` with a c10d
  rendezvous on 127.0.0.1, form one world of 2 (the backend: ddp reference);
- backend: deepspeed under the deepspeed launcher (`deepspeed --num_gpus 2`) and under torchrun reaches the
  same final parameters (weights and ghost-BN running statistics) within 1e-6;
- the raw DeepSpeed command a user types, `deepspeed --num_gpus 2 --module harness train CONFIG --run-dir D`
  (each process gets `--local_rank=N` before `train`), reaches them too;
- a TensorBoard server on the reference run directory serves its scalars over HTTP.
"""

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import yaml
from tests.conftest import ROOT, final_state, harness_env, max_abs_diff, write_config
from tests.slurm_cluster import free_ports

pytestmark = pytest.mark.slow


def launch(*args, timeout=900, **popen):
    return subprocess.Popen([sys.executable, "-m", "launch", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=harness_env(OMP_NUM_THREADS=1), cwd=ROOT, **popen)


def finish(proc, timeout=900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(proc.args)} exited {proc.returncode}\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def config(tmp_path_factory, digits_shards):
    tmp = tmp_path_factory.mktemp("launch")
    return write_config(tmp / "wrn10.yaml", f"""
seed: 5
precision: fp32
model: {{name: wrn, depth: 10, width: 1, ghost_batch_size: 16}}
data: {{name: digits, path: {digits_shards}, augment: true}}
batch: {{global_batch_size: 64, micro_batch_size: 16}}
optim: {{name: momentum, effective_lr: 1.0}}
budget: {{steps: 8}}
log: {{every_steps: 1, progress: false}}
""")


@pytest.fixture(scope="module")
def two_node_run(config, tmp_path_factory):
    """Two `torchrun --nnodes 2` (one per emulated node, started by two launchers) training one run."""
    run = tmp_path_factory.mktemp("two-node") / "run"
    (port,) = free_ports(1)
    nodes = [launch("--nodes", 2, "--nproc-per-node", 1, "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t2n",
                    config, "--run-dir", run) for _ in range(2)]
    outputs = [finish(p) for p in nodes]
    return run, outputs


def test_two_torchrun_nodes_train_together(two_node_run):
    run, outputs = two_node_run
    for out in outputs:
        assert "torchrun: 2 node(s) x 1 process(es)" in out and "--nnodes=2" in out
        assert "--rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:" in out and "--standalone" not in out
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["steps"] == 8
    assert result["layout"] == {"global_batch_size": 64, "world_size": 2, "micro_batch_size": 16,
                                "accumulation_steps": 2, "ghost_batch_size": 16}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["update_norm"] > 1e-3  # the weights moved: the comparisons below are not vacuous
    assert max(r["grad_norm"] for r in records if "grad_norm" in r) > 1.0  # DeepSpeed's default clip (1.0) would bite


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_deepspeed_matches_ddp(launcher, config, two_node_run, tmp_path):
    ref_run, _ = two_node_run
    run = tmp_path / f"ds-{launcher}"
    out = finish(launch("--launcher", launcher, "--nproc-per-node", 2, config, "--run-dir", run,
                        "--set", "backend=deepspeed"))
    if launcher == "deepspeed":
        assert "-m deepspeed.launcher.runner --num_gpus=2" in out  # what the `deepspeed` script runs
    assert '"gradient_accumulation_steps": 2, "gradient_clipping": 0.0' in out  # the DeepSpeed engine, as configured
    assert yaml.safe_load((run / "config.yaml").read_text())["backend"] == "deepspeed"
    result, ref = (json.loads((r / "result.json").read_text()) for r in (run, ref_run))
    assert result["layout"] == ref["layout"] and result["test_accuracy"] == ref["test_accuracy"]
    assert abs(result["train_loss"] - ref["train_loss"]) < 1e-6
    # Every weight and every ghost-BN running statistic: the latter prove update_running_stats ran per step.
    assert max_abs_diff(final_state(run), final_state(ref_run)) < 1e-6


def test_raw_deepspeed_command_matches_ddp(config, two_node_run, tmp_path):
    """No `python -m launch`: the deepspeed script itself, as DeepSpeed's docs write it. On this CPU-only machine
    DeepSpeed selects its CPU accelerator (device_count() = NUMA nodes, >= 1), so --num_gpus 2 starts 2 gloo
    processes. --master_port: a free one, so concurrent sessions on this machine do not collide on 29500."""
    ref_run, _ = two_node_run
    run = tmp_path / "raw-ds"
    (port,) = free_ports(1)
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(port), "--module", "harness", "train", str(config),
           "--run-dir", str(run), "--set", "backend=deepspeed"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=harness_env(OMP_NUM_THREADS=1), cwd=ROOT, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "'--local_rank=0', 'train'" in out and "'--local_rank=1', 'train'" in out  # what the launcher passed
    result, ref = (json.loads((r / "result.json").read_text()) for r in (run, ref_run))
    assert result["layout"] == ref["layout"] and result["layout"]["world_size"] == 2
    assert abs(result["train_loss"] - ref["train_loss"]) < 1e-6
    assert max_abs_diff(final_state(run), final_state(ref_run)) < 1e-6


def get_json(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def test_tensorboard_serves_the_run(two_node_run, tmp_path):
    run, _ = two_node_run
    (port,) = free_ports(1)
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(run), "--port", str(port),
                               "--host", "127.0.0.1", "--load_fast=false"],
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "tb.log", "w"))
    base = f"http://127.0.0.1:{port}/data/plugin/scalars"
    try:
        deadline, tags = time.time() + 180, {}
        while "train/loss" not in tags.get("tb", {}):
            assert server.poll() is None, (tmp_path / "tb.log").read_text()[-3000:]
            assert time.time() < deadline, f"TensorBoard never listed the run's scalars: {tags}"
            try:
                tags = get_json(f"{base}/tags")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        assert {"train/loss", "train/lr", "train/grad_norm", "test/accuracy"} <= tags["tb"].keys()
        query = urllib.parse.urlencode({"run": "tb", "tag": "train/loss"})
        served = get_json(f"{base}/scalars?{query}")  # [[wall_time, step, value], ...]
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        expect = [(r["step"], r["train_loss"]) for r in logged if "train_loss" in r]
        assert [s for _, s, _ in served] == [s for s, _ in expect] == list(range(1, 9))
        assert all(abs(v - e) <= 1e-6 * abs(e) for (_, _, v), (_, e) in zip(served, expect))
    finally:
        server.terminate()
        server.wait(timeout=30)
