"""Packed runs (harness/train/packed.py) give the same run directories and results as `harness train`, in fp64."""

import json
import math

from pathlib import Path

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
    assert pack_key(wrn) is not None and pack_key(wrn) != pack_key(a)  # conv nets with ghost BN pack too
    clipped = to_dict(from_dict(config(digits_shards, "sgd", 0.5, 0, optim={"name": "sgd", "grad_clip_norm": 1.0})))
    assert pack_key(clipped) is None  # gradient clipping: one run per process


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


FAMILIES = {  # (data fixture, model, B, largest micro-batch): every packable family, tiny
    "wrn-ghost-bn": ("cifar_shards", {"name": "wrn", "depth": 10, "width": 1}, 128, 64),
    "wrn-skipinit": ("cifar_shards", {"name": "wrn", "depth": 10, "width": 1, "norm": "skipinit", "dropout": 0.3}, 32, 16),
    "resnet": ("cifar_shards", {"name": "resnet", "depth": 18, "width": 8}, 128, 64),
    "autoencoder": ("digits_shards", {"name": "autoencoder", "widths": [16, 4], "sparse_init": 4}, 64, 32),
    "convnet": ("mnist1d_shards", {"name": "convnet", "channels": [4, 4, 4], "ghost_batch_size": 16}, 64, 32),
}


def data_name(shards) -> str:
    return "cifar10" if "cifar" in str(shards) else "mnist1d" if "mnist1d" in str(shards) else "digits"


def family_config(shards, model, b, micro, opt, lr, seed, wd=5e-4, **extra):
    return {"seed": seed, "precision": "fp64", "device": "cpu", "model": model,
            "data": {"name": data_name(shards), "path": str(shards)},
            "batch": {"global_batch_size": b, "max_micro_batch_size": micro},
            "optim": {"name": opt, "effective_lr": lr, "weight_decay": wd}, "budget": {"steps": 6},
            "eval": {"every_steps": 3}, "log": {"every_steps": 2, "progress": False, "tensorboard": False}, **extra}


FAMILY_RUNS = [("momentum", 0.05, 0, 5e-4), ("sgd", 0.1, 1, 5e-4), ("momentum", 0.02, 1, 1e-3)]  # opt, lr, seed, wd


@pytest.fixture(scope="module")
def wrn_alone_runs(tmp_path_factory, cifar_shards) -> list[tuple[Path, dict]]:
    """The WRN ghost-BN family's runs trained one by one (fp64 WRN runs are this module's most expensive part):
    compared with the pack of them, and with the interrupted pack's runs, which are the first two of them."""
    _, model, b, micro = FAMILIES["wrn-ghost-bn"]
    tmp = tmp_path_factory.mktemp("wrn-alone")
    return [(tmp / f"alone{i}", train(from_dict(family_config(cifar_shards, model, b, micro, *r)), tmp / f"alone{i}"))
            for i, r in enumerate(FAMILY_RUNS)]


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_conv_nets_and_autoencoder_equal_separate_runs(family, tmp_path, request, wrn_alone_runs):
    """Each family as a pack of three runs (two seeds, SGD and Momentum, two weight decays) equals the same
    runs trained one by one: final weights and BN statistics within 1e-10 in fp64, the same results and metrics."""
    fixture, model, b, micro = FAMILIES[family]
    shards = request.getfixturevalue(fixture)
    cfgs = [from_dict(family_config(shards, model, b, micro, *r)) for r in FAMILY_RUNS]
    results = train_pack(cfgs, [tmp_path / f"packed{i}" for i in range(3)])
    assert all(r["status"] == "completed" and r["packed_runs"] == 3 for r in results)
    shared = wrn_alone_runs if family == "wrn-ghost-bn" else None
    for i, cfg in enumerate(cfgs):
        alone, ref = shared[i] if shared else (tmp_path / f"alone{i}", train(cfg, tmp_path / f"alone{i}"))
        got = results[i]
        assert got["test_metric"] == ref["test_metric"] and got["steps"] == ref["steps"] == 6
        metric = ref["test_metric"]
        assert abs(got[metric] - ref[metric]) < 1e-8 and abs(got["train_loss"] - ref["train_loss"]) < 1e-10
        assert max_abs_diff(final_state(tmp_path / f"packed{i}"), final_state(alone)) < 1e-10
        mine = [json.loads(line) for line in (tmp_path / f"packed{i}" / "metrics.jsonl").read_text().splitlines()]
        theirs = [json.loads(line) for line in (alone / "metrics.jsonl").read_text().splitlines()]
        assert [sorted(m) for m in mine] == [sorted(t) for t in theirs]
        for m, t in zip(mine, theirs):
            for key, value in t.items():
                if key != "examples_per_second":
                    assert math.isclose(m[key], value, rel_tol=1e-8, abs_tol=1e-10), (family, key, m[key], value)


@pytest.mark.slow
def test_an_interrupted_pack_resumes_from_its_checkpoints_packed_or_alone(tmp_path, cifar_shards, wrn_alone_runs):
    """A pack stopped after step 4 checkpoints there (besides its periodic one at step 3) and resumes: packed, or as
    a plain `harness train` run
    (the checkpoints are in the trainer's format); both end where an uninterrupted run ends (1e-10, fp64): the
    family test's runs of the same configs (the checkpoint period does not change a trajectory)."""
    fixture, model, b, micro = FAMILIES["wrn-ghost-bn"]
    cfgs = [from_dict(family_config(cifar_shards, model, b, micro, *r, checkpoint={"every_steps": 3}))
            for r in FAMILY_RUNS[:2]]
    dirs = [tmp_path / f"p{i}" for i in range(2)]
    calls = {"n": 0}

    def stop_after_four_steps():
        calls["n"] += 1
        return calls["n"] > 4

    assert train_pack(cfgs, dirs, stop=stop_after_four_steps) == [None, None]
    assert all((d / "checkpoints" / f"step-0000000{s}.pt").is_file() for d in dirs for s in (3, 4))
    assert not any((d / "result.json").exists() for d in dirs)
    resumed = train_pack(cfgs[:1], dirs[:1])  # packed (a pack of one)
    alone = train(cfgs[1], dirs[1])  # the plain trainer, from the pack's checkpoint
    assert resumed[0]["status"] == alone["status"] == "completed"
    assert [s["from_step"] for s in alone["segments"]] == [0, 4]
    for i, (ref, _) in enumerate(wrn_alone_runs[:2]):
        assert max_abs_diff(final_state(dirs[i]), final_state(ref)) < 1e-10
