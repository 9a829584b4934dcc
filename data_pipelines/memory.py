"""In-memory reader for small image datasets (digits, CIFAR, MNIST).

Ordering guarantee: global batch i is exactly the stream positions [i B, (i+1) B) of
`order.ExampleOrder(N, seed)` (one permutation per epoch), whatever the layout; this rank's micro-batch
(a, r) is the slice `plan.micro_slice(a, r)` of it. Augmentation is keyed per (seed, epoch, example).
The uint8 images live on the training device, so cropping and normalization run there (GPU if any).
Training micro-batches are (inputs, targets, keys): keys are the examples' 64-bit (seed, epoch, index) keys
as int64, for per-example dropout masks (models.dropout). Task "reconstruction" (the autoencoder): inputs
scaled to [0, 1] (x / 255, no mean/std normalization) and targets = inputs.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from data_pipelines import DataSpec
from data_pipelines.augment import crop_flip, crop_flip_params
from data_pipelines.order import ExampleOrder, example_keys
from data_pipelines.shards import iter_samples, split_entry, verify_shards
from harness.errors import DataError

# (pad, flip) of each dataset's standard augmentation; pad 0 means none.
AUGMENT = {"cifar10": (4, True), "cifar100": (4, True), "digits": (1, False), "mnist": (0, False)}
IMAGE_EXTS = ("png", "jpg", "jpeg", "npy")


def _decode(sample: dict) -> np.ndarray:
    for ext in IMAGE_EXTS:
        if ext in sample:
            data = sample[ext]
            if ext == "npy":
                return np.load(io.BytesIO(data))
            return np.asarray(Image.open(io.BytesIO(data)))
    raise KeyError(f"no image member (one of {', '.join(IMAGE_EXTS)})")


def load_split(root: Path, manifest: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split as uint8 (N, C, H, W) plus int64 labels, in canonical (key) order."""
    entry = split_entry(manifest, root, split)
    paths = verify_shards(root, entry)
    c, h, w = manifest["image_shape"]
    n, classes = entry["size"], len(manifest["classes"])
    images = np.empty((n, h, w, c), dtype=np.uint8)
    labels = np.full(n, -1, dtype=np.int64)
    for sample in iter_samples(paths):
        where = f"sample {sample.get('__key__')} of shard {sample.get('__url__')}"
        try:
            index = int(sample["__key__"])
            label = int(sample["cls"])
            image = _decode(sample)
        except (KeyError, ValueError, OSError, UnidentifiedImageError) as e:
            raise DataError(f"{where} is unreadable ({e}); re-run the conversion into {root}") from None
        if not 0 <= index < n:
            raise DataError(f"{where}: key {index} is outside the split size {n}; re-run the conversion into {root}")
        if not 0 <= label < classes:
            raise DataError(f"{where}: label {label} is outside 0..{classes - 1}; fix the source labels and re-convert")
        images[index] = image.reshape(h, w, c)
        labels[index] = label
    if (labels < 0).any():
        raise DataError(f"the {split!r} split in {root} lacks {(labels < 0).sum()} of its {n} examples; re-run the conversion")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


class InMemoryImages:
    def __init__(self, path, manifest, plan, seed, rank, device, dtype, augment, eval_batch_size,
                 task: str = "classification"):
        root = Path(path)
        self.reconstruct = task == "reconstruction"
        self.kind = manifest["kind"]
        self.plan, self.seed, self.rank = plan, seed, rank
        self.device, self.dtype = device, dtype
        self.eval_batch_size = eval_batch_size
        self.train_x, self.train_y = (t.to(device) for t in load_split(root, manifest, "train"))
        self.test_x, self.test_y = (t.to(device) for t in load_split(root, manifest, "test"))
        self.pad, self.flip = AUGMENT.get(self.kind, (0, False)) if augment else (0, False)
        self.order = ExampleOrder(len(self.train_y), seed)
        # x_normalized = x_uint8 * scale + shift, per channel: (x / 255 - mean) / std.
        std = torch.tensor(manifest["std"], dtype=torch.float64)
        mean = torch.tensor(manifest["mean"], dtype=torch.float64)
        self.scale = (1.0 / (255.0 * std)).to(device, dtype).view(1, -1, 1, 1)
        self.shift = (-mean / std).to(device, dtype).view(1, -1, 1, 1)
        if self.reconstruct:  # pixels in [0, 1]: the autoencoder's logistic outputs reconstruct them
            self.scale = torch.full_like(self.scale, 1.0 / 255.0)
            self.shift = torch.zeros_like(self.shift)
        self.spec = DataSpec(
            kind=self.kind, task=task, num_train=len(self.train_y), num_test=len(self.test_y),
            num_classes=len(manifest["classes"]), in_shape=tuple(manifest["image_shape"]),
        )

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x.to(self.dtype), self.scale)

    def train_micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        base = step * self.plan.global_batch_size
        out = []
        for a in range(self.plan.accumulation_steps):
            lo, hi = self.plan.micro_slice(a, self.rank)
            idx, epochs = self.order.lookup(base + lo, base + hi)
            index = torch.from_numpy(idx).to(self.device)
            keys = example_keys(self.seed, epochs, idx)
            x = self.train_x[index]
            if self.pad or self.flip:
                dy, dx, fl = crop_flip_params(keys, self.pad, self.flip)
                x = crop_flip(x, dy, dx, fl, self.pad)
            x = self._normalize(x)
            out.append((x, x if self.reconstruct else self.train_y[index],
                        torch.from_numpy(keys.view(np.int64)).to(self.device)))
        return out

    def eval_batches(self):
        """This rank's contiguous share of the test split; the shares cover it exactly once."""
        n, w = len(self.test_y), self.plan.world_size
        lo, hi = self.rank * n // w, (self.rank + 1) * n // w
        for start in range(lo, hi, self.eval_batch_size):
            stop = min(hi, start + self.eval_batch_size)
            x = self._normalize(self.test_x[start:stop])
            yield x, x if self.reconstruct else self.test_y[start:stop]
