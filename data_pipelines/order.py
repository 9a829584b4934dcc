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
