"""Vectorized per-example image augmentation, keyed per example (layout invariance, promise 1).

Pad-and-crop plus optional left-right flip (CIFAR: pad 4, random 32x32 crop, flip; sec. 4). Each
example's crop offset and flip come from its own 64-bit key (see order.example_keys), never from a
shared generator, so an example is augmented identically on whichever rank or micro-step handles it.
The whole batch is cropped with one gather on whatever device the images live on.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def crop_flip_params(keys: np.ndarray, pad: int, flip: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dy, dx, flip) per key: offsets in [0, 2 pad], flip a coin (all zero when flip is off)."""
    span = np.uint64(2 * pad + 1)
    dy = (keys % span).astype(np.int64)
    dx = ((keys >> np.uint64(16)) % span).astype(np.int64)
    fl = ((keys >> np.uint64(32)) & np.uint64(1)).astype(bool) if flip else np.zeros(len(keys), dtype=bool)
    return dy, dx, fl


def crop_flip(images: torch.Tensor, dy: np.ndarray, dx: np.ndarray, fl: np.ndarray, pad: int) -> torch.Tensor:
    """Zero-pad (N, C, H, W) images by `pad`, take the H x W window at (dy, dx), mirror where fl."""
    n, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (pad, pad, pad, pad))
    dy_t = torch.from_numpy(dy).to(dev)
    dx_t = torch.from_numpy(dx).to(dev)
    cols = torch.arange(w, device=dev)
    cols = torch.where(torch.from_numpy(fl).to(dev)[:, None], cols.flip(0), cols) + dx_t[:, None]  # (n, w)
    rows = torch.arange(h, device=dev) + dy_t[:, None]  # (n, h)
    wp = w + 2 * pad
    flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    return padded.reshape(n, c, -1).gather(2, flat).reshape(n, c, h, w)
