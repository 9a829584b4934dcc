"""The fake-CUDA tier, packed runs: harness.train.packed.train_pack (R runs as one vmapped model) on fake cuda:0,
every packable family (MLP, WRN ghost BN, WRN SkipInit with keyed dropout, ResNet, autoencoder, convnet).
What runs and what does not: as in tests/test_fake_cuda_train.py (the graph walk stands in for backward)."""

from __future__ import annotations

import pytest
import torch

from harness.train import checkpoint as checkpoint_module
from harness.train import packed
from harness.train import record as record_module
from tests.fake_cuda import FakeCuda
from tests.test_fake_cuda_train import STEPS, Saved, fake_config, restore_math_mode

pytestmark = pytest.mark.fake_cuda

PACKABLE = {
    "mlp": ("digits_shards", "digits", ["model.name=mlp", "batch.global_batch_size=32"]),
    "wrn-ghost-bn": ("cifar_shards", "cifar10", ["model.name=wrn", "model.depth=10", "model.width=1",
                                                 "model.ghost_batch_size=16", "batch.global_batch_size=32"]),
    "wrn-skipinit-dropout": ("cifar_shards", "cifar10", ["model.name=wrn", "model.depth=10", "model.width=1",
                                                         "model.norm=skipinit", "model.dropout=0.3",
                                                         "batch.global_batch_size=16"]),
    "resnet": ("cifar_shards", "cifar10", ["model.name=resnet", "model.depth=18", "model.width=8",
                                           "model.ghost_batch_size=16", "batch.global_batch_size=32"]),
    "autoencoder": ("digits_shards", "digits", ["model.name=autoencoder", "model.widths=[16,4]",
                                                "batch.global_batch_size=32"]),
    "convnet": ("mnist1d_shards", "mnist1d", ["model.name=convnet", "model.channels=[4,4,4]",
                                              "model.ghost_batch_size=16", "batch.global_batch_size=32"]),
}


def fake_pack(monkeypatch, cfgs, dirs):
    fc, saved = FakeCuda(), Saved()
    step_phase = lambda self, step, want_norms: "step[log]" if want_norms else "step"  # noqa: E731
    for name, phase in (("step", step_phase), ("read_back", "read_back"), ("evaluate", "eval"),
                        ("save_checkpoints", "checkpoint"), ("train", "loop")):
        monkeypatch.setattr(packed.Pack, name, fc.phased(phase, getattr(packed.Pack, name)))
    monkeypatch.setattr(record_module, "atomic_save_torch", saved)
    monkeypatch.setattr(checkpoint_module, "atomic_save_torch", saved)
    try:
        with fc:
            results = packed.train_pack(cfgs, dirs)
    finally:
        restore_math_mode()
    return fc, results, saved


@pytest.mark.parametrize("family", list(PACKABLE))
def test_every_packed_family_trains_on_fake_cuda(family, monkeypatch, tmp_path, request):
    """Three runs (two seeds, SGD and Momentum, warm-up: the per-run learning rates change every step) as one
    pack: no host sync in a step, one copy per read-back, every run completed."""
    fixture, name, extra = PACKABLE[family]
    shards = request.getfixturevalue(fixture)
    runs = [("momentum", 0.05, 0), ("sgd", 0.1, 1), ("momentum", 0.02, 1)]
    cfgs = [fake_config(shards, name, "precision=fp32", *extra, f"optim.name={opt}", f"optim.effective_lr={lr}",
                        f"seed={seed}", "schedule.warmup_steps=3") for opt, lr, seed in runs]
    fc, results, saved = fake_pack(monkeypatch, cfgs, [tmp_path / f"run{i}" for i in range(3)])
    assert [r["status"] for r in results] == ["completed"] * 3 and all(r["steps"] == STEPS for r in results)
    assert not fc.syncs("step", "step[log]"), fc.describe(fc.syncs("step", "step[log]"))
    read_backs = fc.syncs("read_back")
    assert [r.kind for r in read_backs] == ["sync cuda->cpu copy"] * 4, fc.describe(read_backs)  # steps 2, 3, 4, 5
    assert not fc.kinds("non_blocking copy from unpinned memory"), fc.describe(fc.kinds("non_blocking"))
    checkpoints = [t for n, t in saved.files if n.startswith("step-")]
    assert len(checkpoints) == 3 and all(t["rng.cuda"][:2] == ("cpu", torch.uint8) for t in checkpoints)
