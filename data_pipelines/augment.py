"""Vectorized per-example image augmentation, keyed per example (layout invariance, promise 1).

Pad-and-crop plus optional left-right flip (CIFAR: pad 4, random 32x32 crop, flip; sec. 4). Each
example's crop offset and flip come from its own 64-bit key (see order.example_keys), never from a
shared generator, so an example is augmented identically on whichever rank or micro-step handles it.
The whole batch is cropped with one gather on whatever device the images live on: `PaddedImages` keeps
the training set zero-padded (and, when flipping, also mirrored) so that every crop is a set of contiguous
rows of that store, gathered by one `index_select` (about 3x faster than a per-pixel gather on one core).
`crop_flip` is the plain reference it must equal.
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


def device_crop_flip_params(keys, pad: int, flip: bool):
    """crop_flip_params on int64 device tensors of keys: the same (dy, dx, flip), computed where the keys are."""
    from harness.core.hashing import shr, umod

    span = 2 * pad + 1
    dy, dx = umod(keys, span), umod(shr(keys, 16), span)
    fl = (shr(keys, 32) & 1).bool() if flip else torch.zeros_like(keys, dtype=torch.bool)
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


class PaddedImages:
    """A uint8 (N, C, H, W) image set stored zero-padded by `pad` (plus a mirrored copy if `flip`), from
    which `crop(...)` takes any batch of keyed crops with one row gather."""

    def __init__(self, images: torch.Tensor, pad: int, flip: bool):
        n, c, h, w = images.shape
        self.pad, self.shape = pad, (c, h, w)
        padded = F.pad(images, (pad, pad, pad, pad))
        # (2 or 1, N, C, H + 2 pad, W + 2 pad), contiguous: copy 1 is mirrored left-right.
        self.store = torch.stack([padded, padded.flip(-1)]) if flip else padded[None].contiguous()
        self.images = self.store[0, :, :, pad : pad + h, pad : pad + w]  # the unpadded images, a view
        flat = self.store.view(-1)
        # Every position of the store as the start of a W-wide row (overlapping, a view: no copy).
        self._rows = flat.as_strided((flat.numel() - w + 1, w), (1, 1))
        s = self.store.stride()
        self._row_offsets = (torch.arange(c, device=images.device)[:, None] * s[2]
                             + torch.arange(h, device=images.device)[None, :] * s[3]).reshape(1, -1)  # (1, C H)
        self._strides = s

    def crop(self, index: torch.Tensor, dy, dx, fl) -> torch.Tensor:
        """Images `index` cropped at (dy, dx) of the padded image and mirrored where fl: equals crop_flip.
        The offsets and flips may be numpy arrays or tensors on the images' device (no copy then)."""
        c, h, w = self.shape
        dev = index.device
        dy_t, dx_t = torch.as_tensor(dy, device=dev), torch.as_tensor(dx, device=dev)
        fl_t = torch.as_tensor(fl, device=dev).to(torch.int64)
        # Mirroring the padded image then cropping at dx equals cropping at 2 pad - dx then mirroring.
        dx_t = torch.where(fl_t.bool(), 2 * self.pad - dx_t, dx_t)
        s = self._strides
        base = fl_t * s[0] + index * s[1] + dy_t * s[3] + dx_t  # (n,)
        rows = (base[:, None] + self._row_offsets).reshape(-1)
        return self._rows.index_select(0, rows).view(len(index), c, h, w)
