"""Dropout whose mask is keyed per example, so a dropout model keeps promise 1 (layout invariance).

torch's dropout draws its mask from one generator per process: which rank and micro-step an example
lands on would then decide its mask. Here every example carries a 64-bit key from the data reader
(images: (seed, epoch, example index), the same key as its augmentation; token streams: (seed, step,
stream)), and the mask of element i of example b at dropout layer s is a pure function of
(key_b, s, i): splitmix64 (Steele et al. 2014) counter-based hashing, computed in int64 tensor arithmetic on
the device (harness/core/hashing.py). An example is therefore dropped identically whichever rank, micro-batch
or accumulation step holds it, exactly like its augmentation.

Usage: the objective wraps the forward pass in `with dropout_keys(model, keys): model(x)`. In training mode a
KeyedDropout layer without keys raises (a silently unkeyed mask would break the promise); in eval it is the
identity. Layer s is the s-th KeyedDropout of `model.modules()`, a fixed order.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from harness.core.hashing import GOLDEN, as_int64, mix, shr


def keep_mask(keys: torch.Tensor, site: int, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """Boolean keep-mask (len(keys), *shape): element i of example b is kept with probability 1 - p,
    decided by hash(keys[b], site, i) only."""
    n = 1
    for d in shape:
        n *= d
    base = mix(keys.to(torch.int64) + as_int64((site + 1) * GOLDEN))  # one splitmix64 stream per (example, layer)
    counter = torch.arange(1, n + 1, dtype=torch.int64, device=keys.device)
    bits = shr(mix(base[:, None] + counter[None, :] * GOLDEN), 11)  # 53 uniform bits
    return (bits >= round(p * 2.0**53)).view(len(keys), *shape)


class KeyedDropout(nn.Module):
    """Inverted dropout (kept units scaled by 1/(1-p), as torch's) over (N, *) inputs, mask keyed per example."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.keys: torch.Tensor | None = None  # set by dropout_keys() around each training forward
        self.site = 0

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.keys is None:
            raise RuntimeError("KeyedDropout needs per-example keys in training: wrap the forward pass in "
                               "models.dropout.dropout_keys(model, keys) (the data reader provides the keys)")
        if len(self.keys) != x.shape[0]:
            raise RuntimeError(f"KeyedDropout got {len(self.keys)} keys for {x.shape[0]} examples")
        keep = keep_mask(self.keys, self.site, tuple(x.shape[1:]), self.p)
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


def keyed_dropout_layers(model: nn.Module) -> list[KeyedDropout]:
    return [m for m in model.modules() if isinstance(m, KeyedDropout)]


@contextlib.contextmanager
def dropout_keys(model: nn.Module, keys: torch.Tensor | None):
    """Give the model's KeyedDropout layers the keys of the examples in this forward pass (int64, one each)."""
    layers = keyed_dropout_layers(model)
    for site, layer in enumerate(layers):
        layer.keys, layer.site = keys, site
    try:
        yield
    finally:
        for layer in layers:
            layer.keys = None
