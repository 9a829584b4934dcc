"""One run through `harness train`: the run directory describes itself."""

import json

import pytest

import yaml
from tests.conftest import final_state, run_harness, write_config


def tiny_config(tmp_path, shards, extra=""):
    return write_config(tmp_path / "tiny.yaml", f"""
seed: 0
model: {{name: wrn, depth: 10, width: 1}}
data: {{name: cifar10, path: {shards}}}
batch: {{global_batch_size: 64}}
optim: {{name: momentum, effective_lr: 0.5}}
budget: {{steps: 6}}
eval: {{every_steps: 3}}
log: {{every_steps: 2, progress: false}}
{extra}
""")


def test_run_directory_is_self_describing(tmp_path, cifar_shards):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    proc = run_harness("train", tiny_config(tmp_path, cifar_shards), "--run-dir", run)
    assert "plan 64 = 64 micro x 1 accum x 1 ranks; 1 ghost groups of 64" in proc.stdout
    assert "TensorBoard logs:" in proc.stdout and "tensorboard --logdir" in proc.stdout

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["optim"]["effective_lr"] == 0.5 and cfg["model"]["ghost_batch_size"] == 64  # resolved, defaults in
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert {"step", "lr", "effective_lr", "train_loss", "temperature", "grad_norm", "examples_per_second"} <= train[0].keys()
    assert train[0]["lr"] == pytest.approx(0.05) and train[0]["temperature"] == pytest.approx(0.5 / 64)
    assert [r["step"] for r in records if "test_accuracy" in r] == [3, 6]

    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["steps"] == 6
    for key in ("train_loss", "test_accuracy", "test_loss", "examples_per_second", "wall_seconds"):
        assert isinstance(result[key], float), key
    assert result["layout"] == {"global_batch_size": 64, "world_size": 1, "micro_batch_size": 64,
                                "accumulation_steps": 1, "ghost_batch_size": 64}
    assert "model" in __import__("torch").load(run / "checkpoints" / "final.pt", weights_only=True)
    env = json.loads((run / "env.json").read_text())
    assert env["packages"]["torch"] and env["world_size"] == 1

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "train/lr", "train/effective_lr", "train/temperature",
            "train/examples_per_second", "train/grad_norm", "test/accuracy"} <= tags


def test_finished_run_is_not_repeated_and_config_is_guarded(tmp_path, cifar_shards):
    cfg = tiny_config(tmp_path, cifar_shards)
    run = tmp_path / "run"
    run_harness("train", cfg, "--run-dir", run)
    before = final_state(run)
    again = run_harness("train", cfg, "--run-dir", run)
    assert "already finished" in again.stdout
    assert all((before[k] == v).all() for k, v in final_state(run).items())
    other = run_harness("train", cfg, "--run-dir", run, "--set", "optim.effective_lr=0.25", check=False)
    assert other.returncode == 2 and "different config (optim.effective_lr: 0.5 -> 0.25)" in other.stderr
