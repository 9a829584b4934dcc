"""Data order: global batch i is the same examples, augmented the same, at every layout."""

import numpy as np
import pytest
import torch

from data_pipelines import build_data
from data_pipelines.order import ExampleOrder, example_keys
from harness.recipe.batch_plan import make_batch_plan


def source(path, b, w, m, rank, seed=3):
    plan = make_batch_plan(b, w, m, ghost_batch_size=64)
    return build_data("cifar10", path, True, 100, plan, seed, rank, torch.device("cpu"), torch.float64)


def global_batch(path, b, w, m, step):
    """Concatenate every rank's micro-batches of `step` in (micro-step, rank) order."""
    plan = make_batch_plan(b, w, m, ghost_batch_size=64)
    per_rank = [source(path, b, w, m, r).train_micro_batches(step) for r in range(w)]
    xs, ys, keys = zip(*[per_rank[r][a] for a in range(plan.accumulation_steps) for r in range(w)])
    return torch.cat(xs), torch.cat(ys), torch.cat(keys)


@pytest.mark.parametrize("step", [0, 1, 3])  # B = 192 does not divide N = 512: step 2 crosses an epoch
def test_global_batch_identical_at_every_layout(cifar_shards, step):
    ref_x, ref_y, ref_keys = global_batch(cifar_shards, 192, 1, 192, step)
    for w, m in [(1, 64), (3, 64), (3, 64)]:
        x, y, keys = global_batch(cifar_shards, 192, w, m, step)
        assert torch.equal(y, ref_y) and torch.equal(x, ref_x)
        assert torch.equal(keys, ref_keys)  # per-example dropout keys (models.dropout) follow the example


def test_epochs_are_permutations_and_reshuffled():
    order = ExampleOrder(10, seed=7)
    idx, epochs = order.lookup(0, 30)
    for e in range(3):
        assert sorted(idx[epochs == e]) == list(range(10))
    assert not np.array_equal(idx[:10], idx[10:20])
    straddle, _ = order.lookup(8, 13)
    assert np.array_equal(straddle, idx[8:13])


def test_augmentation_keyed_per_example(cifar_shards):
    src = source(cifar_shards, 64, 1, 64, 0)
    x0, y0, _ = src.train_micro_batches(0)[0]
    # The same example, drawn by another rank at another position, is augmented identically.
    idx, epochs = src.order.lookup(0, 64)
    keys = example_keys(3, epochs, idx)
    assert len(set(keys.tolist())) == 64
    assert np.array_equal(keys[5:6], example_keys(3, epochs[5:6], idx[5:6]))
    # Augmentation actually happens: crops differ from the raw image for most examples.
    raw = src._normalize(src.train_x[torch.from_numpy(idx)])
    changed = (x0 - raw).abs().flatten(1).amax(1) > 0
    assert changed.float().mean() > 0.8
    # A new epoch draws new crops for the same example.
    k_next = example_keys(3, epochs + 1, idx)
    assert (k_next != keys).all()
