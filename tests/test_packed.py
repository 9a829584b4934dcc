"""Packed runs (harness/train/packed.py) give the same run directories and results as `harness train`, in fp64."""

import json
import math

import pytest
import torch

from data_pipelines.memory import stream_batch
from harness.recipe.batch_plan import make_batch_plan
from harness.train.config import from_dict
from harness.train.packed import pack_key, train_pack
from harness.train.trainer import train
from tests.conftest import final_state, max_abs_diff, run_harness, write_config


def config(digits, opt, lr, seed, **extra):
    return {"seed": seed, "precision": "fp64", "device": "cpu", "model": {"name": "mlp", "hidden": [24, 16]},
            "data": {"name": "digits", "path": str(digits)},
            "batch": {"global_batch_size": 96, "max_micro_batch_size": 48},  # 2 micro-steps per step
            "optim": {"name": opt, "effective_lr": lr, "weight_decay": 5e-4}, "budget": {"epochs": 2},
            "eval": {"every_steps": 10}, "log": {"every_steps": 4, "progress": False},
            "divergence": {"max_loss": 20.0}, **extra}


def test_stream_batches_equal_the_readers_micro_batches(digits_shards):
    from data_pipelines import build_data

    plan = make_batch_plan(96, 1, 48)
    for seed in (0, 3):
        data = build_data("digits", digits_shards, True, 1000, plan, seed, 0, torch.device("cpu"), torch.float64)
        for step in (0, 13, 14):  # step 14 crosses from epoch 0 into epoch 1 (1347 examples)
            x, y = stream_batch(data, seed, step * 96, (step + 1) * 96)
            parts = data.train_micro_batches(step)
            assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))


def test_pack_key_groups_runs_that_differ_only_in_lr_seed_optimizer(digits_shards):
    from harness.core.configlib import to_dict

    a = to_dict(from_dict(config(digits_shards, "sgd", 0.5, 0)))
    b = to_dict(from_dict(config(digits_shards, "momentum", 2.0, 3)))
    c = to_dict(from_dict(config(digits_shards, "sgd", 0.5, 0, batch={"global_batch_size": 32})))
    assert pack_key(a) == pack_key(b) != pack_key(c)
    wrn = to_dict(from_dict({**config(digits_shards, "sgd", 0.5, 0), "model": {"name": "wrn", "depth": 10, "width": 1}}))
    assert pack_key(wrn) is None  # batch norm: one run per process


@pytest.mark.slow
def test_packed_runs_equal_harness_train(tmp_path, digits_shards):
    runs = [("sgd", 0.5, 0), ("momentum", 1.0, 1), ("momentum", 4.0, 0), ("sgd", 500.0, 2)]  # the last diverges
    cfgs = [from_dict(config(digits_shards, *r)) for r in runs]
    packed = [tmp_path / f"packed{i}" for i in range(len(runs))]
    results = train_pack(cfgs, packed)
    assert [r["status"] for r in results] == ["completed", "completed", "completed", "diverged"]
    assert all(r["packed_runs"] == 4 for r in results)
    for i, run in enumerate(runs):
        alone = tmp_path / f"alone{i}"
        if i == 0:  # through the command line once; the others call the same trainer in-process (start-up is slow)
            run_harness("train", write_config(tmp_path / "c.yaml", json.dumps(config(digits_shards, *run))), "--run-dir", alone)
        else:
            train(cfgs[i], alone)
        ref = json.loads((alone / "result.json").read_text())
        got = json.loads((packed[i] / "result.json").read_text())
        assert set(got) - set(ref) == {"packed_runs"} and set(ref) - set(got) == set()
        for key in ("status", "steps", "total_steps", "diverged_at_step", "test_metric", "higher_is_better", "layout"):
            assert got[key] == ref[key], key
        if ref["status"] == "diverged":
            assert not (packed[i] / "checkpoints" / "final.pt").exists() and got["test_accuracy"] is None
            continue
        assert got["epochs"] == pytest.approx(ref["epochs"])
        assert abs(got["train_loss"] - ref["train_loss"]) < 1e-10
        assert got["test_accuracy"] == ref["test_accuracy"] and abs(got["test_loss"] - ref["test_loss"]) < 1e-10
        assert max_abs_diff(final_state(packed[i]), final_state(alone)) < 1e-10
        mine = [json.loads(line) for line in (packed[i] / "metrics.jsonl").read_text().splitlines()]
        theirs = [json.loads(line) for line in (alone / "metrics.jsonl").read_text().splitlines()]
        assert [sorted(m) for m in mine] == [sorted(t) for t in theirs]
        for m, t in zip(mine, theirs):
            for key, value in t.items():
                if key not in ("examples_per_second",):
                    assert math.isclose(m[key], value, rel_tol=1e-9, abs_tol=1e-12), (key, m[key], value)
        assert (packed[i] / "config.yaml").read_text() == (alone / "config.yaml").read_text()
        assert any((packed[i] / "tb").glob("events.out.tfevents.*"))
    # A finished pack is not trained again.
    before = (packed[0] / "result.json").stat().st_mtime_ns
    again = train_pack(cfgs, packed)
    assert [r["status"] for r in again] == [r["status"] for r in results]
    assert (packed[0] / "result.json").stat().st_mtime_ns == before
