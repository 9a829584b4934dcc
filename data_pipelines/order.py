"""Which examples form global batch i, and the per-example random keys for augmentation.

Training samples without replacement, reshuffled every epoch (sec. 2): the examples form one stream,
epoch e being the permutation drawn from (seed, e). Global batch i holds stream positions
[i B, (i+1) B), so a budget that crosses an epoch boundary simply continues into the next permutation.
Nothing here depends on the world size, micro-batch or accumulation: every layout sees the same batches.
"""

from __future__ import annotations

import numpy as np

_PERM_TAG = 0x5EED_0001
_AUG_TAG = 0x5EED_0002


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    # SeedSequence hashes the tuple: permutations of nearby (seed, epoch) pairs are independent.
    return np.random.default_rng([_PERM_TAG, seed, epoch]).permutation(n)


class ExampleOrder:
    """Maps stream positions to (example index, epoch); caches the permutations in use."""

    def __init__(self, num_examples: int, seed: int):
        self.n = num_examples
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = epoch_permutation(self.seed, epoch, self.n)
        return self._cache[epoch]

    def lookup(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Example indices and epochs of stream positions [start, stop)."""
        pos = np.arange(start, stop, dtype=np.int64)
        epochs = pos // self.n
        idx = np.empty_like(pos)
        for e in np.unique(epochs):
            sel = epochs == e
            idx[sel] = self._perm(int(e))[pos[sel] % self.n]
        return idx, epochs


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # Steele et al.'s finalizer; uint64 arithmetic wraps by definition in numpy.
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def example_keys(seed: int, epochs: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """A 64-bit random key per (seed, epoch, example index): the same whichever rank draws the example."""
    with np.errstate(over="ignore"):
        h = _splitmix64(np.full(indices.shape, (_AUG_TAG << 32) ^ seed, dtype=np.uint64))
        h = _splitmix64(h ^ epochs.astype(np.uint64))
        return _splitmix64(h ^ indices.astype(np.uint64))


class DeviceOrder:
    """ExampleOrder on the training device: each epoch's permutation is uploaded once (pinned, asynchronous), and
    stream positions become example indices and epochs by slicing it there, so assembling a batch copies nothing
    from the host. The same permutations as ExampleOrder, so the same batches."""

    def __init__(self, num_examples: int, seed: int, device):
        import torch

        self.n, self.seed, self.device = num_examples, seed, torch.device(device)
        self._cache: dict[int, "torch.Tensor"] = {}

    def _perm(self, epoch: int):
        import torch

        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            perm = torch.from_numpy(epoch_permutation(self.seed, epoch, self.n))
            if self.device.type == "cuda":
                perm = perm.pin_memory()
            self._cache[epoch] = perm.to(self.device, non_blocking=True)
        return self._cache[epoch]

    def lookup(self, start: int, stop: int):
        """Example indices and epochs (int64 device tensors) of stream positions [start, stop)."""
        import torch

        idx, epochs = [], []
        for e in range(start // self.n, (stop - 1) // self.n + 1):
            a, b = max(start, e * self.n) - e * self.n, min(stop, (e + 1) * self.n) - e * self.n
            idx.append(self._perm(e)[a:b])
            epochs.append(torch.full((b - a,), e, dtype=torch.int64, device=self.device))
        return (torch.cat(idx), torch.cat(epochs)) if len(idx) > 1 else (idx[0], epochs[0])


def device_example_keys(seed: int, epochs, indices):
    """example_keys on int64 device tensors: bit for bit the numpy uint64 keys (harness/core/hashing.py)."""
    from harness.core.hashing import as_int64, splitmix64

    h = splitmix64(epochs.new_full(indices.shape, as_int64((_AUG_TAG << 32) ^ seed)))
    h = splitmix64(h ^ epochs)
    return splitmix64(h ^ indices)
