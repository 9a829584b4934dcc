"""In-memory reader for small image datasets (digits, CIFAR, MNIST) and 1-D signals (MNIST-1D).

Ordering guarantee (exact, at every layout): global batch i is exactly the stream positions [i B, (i+1) B) of
`order.ExampleOrder(N, seed)` (one permutation of the N training examples per epoch, drawn from (seed, epoch)),
whatever the number of nodes, GPUs, micro-batch or accumulation steps; this rank's micro-batch (a, r) is the
slice `plan.micro_slice(a, r)` of it. Augmentation is keyed per (seed, epoch, example). Evaluation: rank r
takes the contiguous r-th of W shares of the test split, in key order; the shares cover it exactly once.
A checkpoint needs nothing from this reader: batch i is a function of (seed, i) only.
The uint8 images live on the training device, so cropping and normalization run there (GPU if any).
Training micro-batches are (inputs, targets, keys): keys are the examples' 64-bit (seed, epoch, index) keys
as int64, for per-example dropout masks (models.dropout). Task "reconstruction" (the autoencoder): inputs
scaled to [0, 1] (x / 255, no mean/std normalization) and targets = inputs.

1-D signals (MNIST-1D) are images of one row: (C, 1, L), stored as float32 .npy members (manifest `"dtype":
"float32"`, its mean and std of the raw values). The same store, order, keys and normalization serve them; they
have no augmentation, so every layout gives the same batches exactly as for images.

Held-out split (`data.train_examples: N`): the run trains on N of the split's examples, the first N of ONE
permutation of the split drawn from a fixed seed (HOLDOUT_TAG and the split's size, never the run's seed), kept
in key order: every run, seed and layout with the same N sees the same N examples, and N' > N contains them.
The other examples are not read for anything (no validation set: the paper tunes on the test set, sec. 4);
epochs, and so `budget.epochs`, count N examples. The MNIST configs use N = 50,000: the paper's 156,250 steps
= 200 epochs at B = 64 (appendix D) imply a 50,000-example training set, i.e. 10,000 of MNIST's 60,000 held out.
"""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from data_pipelines.augment import PaddedImages, device_crop_flip_params
from data_pipelines.order import DeviceOrder, ExampleOrder, device_example_keys
from data_pipelines.shards import iter_samples, split_entry, verify_shards
from data_pipelines.spec import DataSpec
from harness.core.errors import ConfigError, DataError

# (pad, flip) of each dataset's standard augmentation; pad 0 means none.
# MNIST-1D: none (its generator already shifts, scales, shears and adds noise to every example; Greydanus trains
# without augmentation).
AUGMENT = {"cifar10": (4, True), "cifar100": (4, True), "digits": (1, False), "mnist": (0, False), "mnist1d": (0, False)}
# The stored value types: uint8 pixels (0..255, normalized as x / 255) or float32 values (normalized as they are).
VALUE_TYPES = {"uint8": (np.uint8, 255.0), "float32": (np.float32, 1.0)}
IMAGE_EXTS = ("png", "jpg", "jpeg", "npy")
HOLDOUT_TAG = 0x5EED_0003  # the held-out split's permutation seed (data_pipelines/order.py has the others)


def held_out_split(num_examples: int, keep: int, where: str = "") -> np.ndarray:
    """The indices (in key order) of the `keep` training examples a run with `data.train_examples: keep` uses:
    the first `keep` of a permutation seeded by (HOLDOUT_TAG, num_examples) only."""
    if not 1 <= keep <= num_examples:
        raise ConfigError(f"config key data.train_examples: {keep} is not in 1 .. {num_examples}, the training "
                          f"examples{where}; give at most {num_examples}")
    perm = np.random.default_rng([HOLDOUT_TAG, num_examples]).permutation(num_examples)
    return np.sort(perm[:keep])


def _decode(sample: dict, shape: tuple[int, int]) -> np.ndarray:
    """The image of a sample; ValueError before decoding when its header's (height, width) is not `shape`, so a
    decompression bomb (a small PNG that inflates to gigabytes) is refused from its header, unread."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            data = sample[ext]
            if ext == "npy":
                return np.load(io.BytesIO(data), allow_pickle=False)
            with warnings.catch_warnings():  # PIL warns above Image.MAX_IMAGE_PIXELS and raises above twice that
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
            if (image.height, image.width) != shape:
                raise ValueError(f"a {image.width}x{image.height} image, the manifest says {shape[1]}x{shape[0]}")
            return np.asarray(image)
    raise KeyError(f"no image member (one of {', '.join(IMAGE_EXTS)})")


def load_split(root: Path, manifest: dict, split: str, skip_bad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split as uint8 (or the manifest's float32) (N, C, H, W) plus int64 labels, in key order.

    skip_bad: leave out unreadable samples and labels out of range (and read what a shard that fails its
    checksum still holds), warn with the count; the split then has fewer examples than the manifest says.
    """
    entry = split_entry(manifest, root, split)
    if skip_bad:
        paths = []
        for shard in entry["shards"]:
            try:
                paths += verify_shards(root, {"shards": [shard]})
            except DataError as e:
                warn(f"{e} (data.skip_bad_samples: reading the samples it still holds)")
                if (root / shard["name"]).is_file():
                    paths.append(root / shard["name"])
    else:
        paths = verify_shards(root, entry)
    if len(manifest.get("image_shape") or ()) != 3 or not isinstance(manifest.get("classes"), list):
        raise DataError(f"{root / 'manifest.json'}: image data needs image_shape [C, H, W] and a list of classes; "
                        f"re-run the conversion into {root}")
    c, h, w = manifest["image_shape"]
    n, classes = entry["size"], len(manifest["classes"])
    dtype = np.dtype(value_type(manifest, root)[0])
    images = np.zeros((n, h, w, c), dtype=dtype)
    labels = np.full(n, -1, dtype=np.int64)
    bad: list[str] = []

    def reject(message: str) -> None:
        if not skip_bad:
            raise DataError(message)
        bad.append(message)

    samples = iter_samples(paths, handler=_skip_rest_of_shard(bad) if skip_bad else None)
    for sample in samples:
        where = f"sample {sample.get('__key__')} of shard {sample.get('__url__')}"
        try:
            index = int(sample["__key__"])
            label = int(sample["cls"])
            image = _decode(sample, (h, w))
        except (KeyError, ValueError, OSError, UnidentifiedImageError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as e:
            reject(f"{where} is unreadable ({e}); re-run the conversion into {root}")
            continue
        if not 0 <= index < n:
            reject(f"{where}: key {index} is outside the split size {n}; re-run the conversion into {root}")
            continue
        if labels[index] >= 0:  # a second sample with this key would silently replace the first
            reject(f"{where}: key {index} appears twice in the split; re-run the conversion into {root}")
            continue
        if not 0 <= label < classes:
            reject(f"{where}: label {label} is outside 0..{classes - 1}; fix the source labels and re-convert")
            continue
        if image.size != h * w * c:
            reject(f"{where}: image of shape {image.shape} is not {c}x{h}x{w}; re-run the conversion into {root}")
            continue
        if image.dtype != dtype:
            reject(f"{where}: values of type {image.dtype}, the manifest says {dtype}; re-run the conversion into {root}")
            continue
        images[index] = image.reshape(h, w, c)
        labels[index] = label
    missing = labels < 0
    if missing.any():
        if not skip_bad:
            raise DataError(f"the {split!r} split in {root} lacks {missing.sum()} of its {n} examples; re-run the conversion")
        keep = ~missing
        images, labels = images[keep], labels[keep]
        warn(f"left out {int(missing.sum())} of the {n} {split} examples in {root} (data.skip_bad_samples); "
             f"first: {bad[0] if bad else 'missing from the shards'}")
        if not len(labels):
            raise DataError(f"the {split!r} split in {root} has no readable example left; re-run the conversion")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def value_type(manifest: dict, root: Path) -> tuple[type, float]:
    """(numpy type, full-scale value) of the stored values: uint8 pixels (255) unless the manifest says float32 (1)."""
    name = manifest.get("dtype", "uint8")
    if name not in VALUE_TYPES:
        raise DataError(f"{root / 'manifest.json'}: dtype {name!r} is not one of {', '.join(VALUE_TYPES)}; "
                        "re-run the conversion with this version of the harness")
    return VALUE_TYPES[name]


def _skip_rest_of_shard(bad: list[str]):
    """webdataset handler: a shard that cannot be read on (truncated, corrupt tar) is left, the rest is kept."""
    def handler(exn: Exception) -> bool:
        bad.append(f"unreadable shard data ({exn})")
        return True
    return handler


def warn(text: str) -> None:
    print(f"harness: warning: {text}", file=sys.stderr)


class InMemoryImages:
    def __init__(self, path, manifest, plan, seed, rank, device, dtype, augment, eval_batch_size, skip_bad=False,
                 task: str = "classification", train_examples: int | None = None):
        root = Path(path)
        self.reconstruct = task == "reconstruction"
        self.kind = manifest["kind"]
        self.plan, self.seed, self.rank = plan, seed, rank
        self.device, self.dtype = device, dtype
        self.eval_batch_size = eval_batch_size
        self.pad, self.flip = AUGMENT.get(self.kind, (0, False)) if augment else (0, False)
        train_x, train_y = load_split(root, manifest, "train", skip_bad)
        if train_examples is not None:  # the held-out split (module docstring)
            keep = torch.from_numpy(held_out_split(len(train_y), train_examples, f" in {root}"))
            train_x, train_y = train_x[keep].contiguous(), train_y[keep]
        self.train = PaddedImages(train_x.to(device), self.pad, self.flip)
        self.train_x, self.train_y = self.train.images, train_y.to(device)  # train_x: unpadded view
        self.test_x, self.test_y = (t.to(device) for t in load_split(root, manifest, "test", skip_bad))
        self.order = ExampleOrder(len(self.train_y), seed)  # the host reference of the device order below
        self._orders = {seed: DeviceOrder(len(self.train_y), seed, device)}  # and other seeds' (packed runs)
        # x_normalized = x * scale + shift, per channel: (x / full - mean) / std, full = 255 for uint8 pixels and
        # 1 for float32 values (whose manifest mean and std are of the raw values).
        _, full = value_type(manifest, root)
        std = torch.tensor(manifest["std"], dtype=torch.float64)
        mean = torch.tensor(manifest["mean"], dtype=torch.float64)
        self.scale = (1.0 / (full * std)).to(device, dtype).view(1, -1, 1, 1)
        self.shift = (-mean / std).to(device, dtype).view(1, -1, 1, 1)
        if self.reconstruct:  # pixels in [0, 1]: the autoencoder's logistic outputs reconstruct them
            if full != 255.0:
                raise ConfigError(f"data {self.kind!r} holds float values, not pixels in [0, 255]: the autoencoder "
                                  "reconstructs images (mnist); use a classifier for it")
            self.scale = torch.full_like(self.scale, 1.0 / 255.0)
            self.shift = torch.zeros_like(self.shift)
        self.spec = DataSpec(
            kind=self.kind, task=task, num_train=len(self.train_y), num_test=len(self.test_y),
            num_classes=len(manifest["classes"]), in_shape=tuple(manifest["image_shape"]),
        )

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x.to(self.dtype), self.scale)

    def stream(self, start: int, stop: int, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training stream positions [start, stop) of the run with `seed` (default: this reader's): the examples
        in that run's order, augmented by their keys and normalized, as (inputs, targets, int64 keys). Global
        batch i is positions [iB, (i+1)B); packed runs (harness/train/packed.py) read their seeds' streams here."""
        seed = self.seed if seed is None else seed
        if seed not in self._orders:
            self._orders[seed] = DeviceOrder(len(self.train_y), seed, self.device)
        index, epochs = self._orders[seed].lookup(start, stop)  # on the device: no host-to-device copy per batch
        keys = device_example_keys(seed, epochs, index)
        if self.pad or self.flip:
            dy, dx, fl = device_crop_flip_params(keys, self.pad, self.flip)
        else:
            dy = dx = torch.full_like(index, self.pad)
            fl = torch.zeros_like(index, dtype=torch.bool)
        x = self._normalize(self.train.crop(index, dy, dx, fl))
        return x, x if self.reconstruct else self.train_y[index], keys

    def train_micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        base = step * self.plan.global_batch_size
        return [self.stream(base + lo, base + hi) for lo, hi in
                (self.plan.micro_slice(a, self.rank) for a in range(self.plan.accumulation_steps))]

    def eval_batches(self, split: str = "test"):
        """This rank's contiguous share of the test split (or, split "train", of the training set without
        augmentation: eval.train_loss); the shares cover it exactly once."""
        images, labels = (self.test_x, self.test_y) if split == "test" else (self.train_x, self.train_y)
        n, w = len(labels), self.plan.world_size
        lo, hi = self.rank * n // w, (self.rank + 1) * n // w
        for start in range(lo, hi, self.eval_batch_size):
            stop = min(hi, start + self.eval_batch_size)
            x = self._normalize(images[start:stop])
            yield x, x if self.reconstruct else labels[start:stop]


def stream_batch(data: InMemoryImages, seed: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of stream positions [start, stop) of the run with `seed` (InMemoryImages.stream)."""
    x, y, _ = data.stream(start, stop, seed)
    return x, y
