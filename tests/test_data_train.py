"""End to end: fakes of the standard distributions -> `harness data convert` -> `harness train` (subprocesses), and
the streaming reader's guarantees under the real torchrun with 2 ranks x 2 loader workers."""

import json
import subprocess
import sys

import pytest

from data_pipelines.convert import convert
from tests import fakes
from tests.conftest import ROOT, harness_env, run_harness, torchrun, write_config

pytestmark = pytest.mark.slow


def train(tmp_path, shards, name, model, batch, extra=""):
    cfg = write_config(tmp_path / f"{name}.yaml", f"""
seed: 0
model: {model}
data: {{name: {name}, path: {shards}{extra}}}
batch: {{global_batch_size: {batch}}}
optim: {{name: momentum, effective_lr: 0.1}}
budget: {{steps: 3}}
eval: {{every_steps: 2}}
log: {{every_steps: 1, progress: false, tensorboard: false}}
""")
    run = tmp_path / f"run-{name}"
    run_harness("train", cfg, "--run-dir", run)
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["steps"] == 3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3]
    return result


@pytest.mark.parametrize("kind", ["cifar10", "cifar100", "mnist", "imagenet"])
def test_convert_then_train(tmp_path, kind):
    if kind.startswith("cifar"):
        src = tmp_path / f"{kind}-python.tar.gz"
        fakes.cifar_tarball(src, kind)
        model, batch, extra = "{name: wrn, depth: 10, width: 1}", 64, ""
    elif kind == "mnist":
        src = tmp_path / "mnist"
        fakes.mnist_files(src)
        model, batch, extra = "{name: mlp, hidden: [32]}", 32, ""
    else:
        src = tmp_path / "ILSVRC2012"
        fakes.imagenet_tree(src, val="csv")
        model, batch, extra = "{name: wrn, depth: 10, width: 1, ghost_batch_size: 16}", 16, \
            ", workers: 0, image_size: 32, eval_resize: 36, eval_batch_size: 8"
    shards = tmp_path / "shards"
    if kind == "imagenet":  # the command line once; the other conversions in-process (same code, faster)
        assert f"wrote {kind} shards to {shards}" in run_harness("data", "convert", kind, src, shards).stdout
    else:
        convert(kind, src, shards)
    result = train(tmp_path, shards, kind, model, batch, extra)
    assert 0 <= result["test_accuracy"] <= 100


def test_convert_then_train_ptb(tmp_path):
    fakes.ptb_files(tmp_path / "ptb")
    convert("ptb", tmp_path / "ptb", tmp_path / "shards")
    result = train(tmp_path, tmp_path / "shards", "ptb", "{name: lstm, hidden: 32, unroll: 8}", 16)
    assert result["train_loss"] > 0


@pytest.mark.parametrize("resampled", [False, True])
def test_stream_under_torchrun_two_ranks_two_workers(tmp_path, imagenet_shards, resampled):
    """Same number of batches on every rank, no example twice per epoch (not resampled), val exactly once."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "stream_probe.py"), str(imagenet_shards), str(tmp_path), "2", str(resampled).lower(), "1.5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=harness_env(OMP_NUM_THREADS=1), timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    per_epoch = ranks[0]["per_epoch"]
    assert per_epoch == 8 and ranks[1]["per_epoch"] == per_epoch  # 2 workers x 256 // (2 ranks x 2 workers) // 16
    assert len(ranks[0]["train"]) == len(ranks[1]["train"]) == 12  # 1.5 epochs, into the second one
    assert all(len(batch) == 16 for r in ranks for batch in r["train"])
    if not resampled:
        first = [k for r in ranks for batch in r["train"][:per_epoch] for k in batch]
        assert sorted(first) == list(range(256))  # every example exactly once in epoch 0, over both ranks
        second = [k for r in ranks for batch in r["train"][per_epoch:] for k in batch]
        assert len(second) == len(set(second)) == 128  # half of epoch 1: no repeats either
    evaluated = sorted(k for r in ranks for batch in r["eval"] for k in batch)
    assert evaluated == list(range(96))


def test_train_streaming_under_torchrun(tmp_path, imagenet_shards):
    """`harness train` on ImageNet-format shards, 2 ranks x 2 workers, across an epoch end and two evaluations."""
    cfg = write_config(tmp_path / "inet.yaml", f"""
seed: 0
model: {{name: wrn, depth: 10, width: 1, ghost_batch_size: 32}}
data: {{name: imagenet, path: {imagenet_shards}, workers: 2, resampled: false, image_size: 32, eval_resize: 36,
        eval_batch_size: 32}}
batch: {{global_batch_size: 64}}
optim: {{name: momentum, effective_lr: 0.1}}
budget: {{steps: 6}}
eval: {{every_steps: 3}}
log: {{every_steps: 3, progress: false, tensorboard: false}}
""")
    run = tmp_path / "run"
    proc = torchrun(2, "train", cfg, "--run-dir", run, timeout=600)
    assert "stream: 4 micro-batches of 32 per rank per epoch (2 ranks x 2 workers x 2" in proc.stdout
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["layout"]["world_size"] == 2 and result["epochs"] == 1.5
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "test_accuracy" in r] == [3, 6]
