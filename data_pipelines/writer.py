"""Writing a dataset's shards resumably: the source fingerprint, the partial manifest an interrupted conversion
resumes from, the progress bar, and in-memory image splits as PNG shards (CIFAR, MNIST, digits) or float32 .npy
shards (MNIST-1D)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from data_pipelines.formats import SOURCES
from data_pipelines.shards import FORMAT, MANIFEST, PARTIAL, read_manifest, write_manifest, write_split
from harness.core.errors import DataError
from harness.core.io import atomic_write_json


def fingerprint(*parts) -> str:
    """A digest of everything that determines the shards' contents (source data and options)."""
    h = hashlib.sha256()

    def add(part) -> None:
        if isinstance(part, np.ndarray):
            h.update(str((part.dtype, part.shape)).encode())
            h.update(np.ascontiguousarray(part).data)
        elif isinstance(part, (list, tuple)):  # item by item: ImageNet's 1.3M names need no giant repr
            h.update(f"[{len(part)}".encode())
            for item in part:
                add(item)
        else:
            h.update(repr(part).encode())
        h.update(b"\0")

    for part in parts:
        add(part)
    return h.hexdigest()


def previous_manifest(dest: Path, source_fingerprint: str) -> dict:
    """The (possibly partial) manifest of an earlier conversion of the same source into `dest`, or {}."""
    for name in (PARTIAL, MANIFEST):
        try:
            old = read_manifest(dest) if name == MANIFEST else _read_json(dest / name)
        except (DataError, OSError, ValueError):
            continue
        if old and old.get("fingerprint") == source_fingerprint:
            return old
    return {}


def previous_splits(dest: Path, source_fingerprint: str) -> dict:
    return previous_manifest(dest, source_fingerprint).get("splits", {})


def _read_json(path: Path) -> dict | None:
    import json

    return json.loads(path.read_text()) if path.is_file() else None


class SplitWriter:
    """Writes the splits of one dataset, recording progress in the partial manifest after every shard."""

    def __init__(self, kind: str, dest: Path, source_fingerprint: str, total: int):
        self.kind, self.dest, self.fp = kind, Path(dest), source_fingerprint
        self.dest.mkdir(parents=True, exist_ok=True)
        self.old = previous_manifest(self.dest, source_fingerprint)
        self.previous = self.old.get("splits", {})
        self.done: dict[str, dict] = {}
        self.notes: Callable[[], dict] = dict  # more keys to keep in the partial manifest
        # Also in a batch job's log (not a terminal): then one update a minute, for conversions that take hours.
        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=f"{kind} -> {dest}", unit="ex", dynamic_ncols=True,
                        mininterval=0.1 if tty else 60, delay=0 if tty else 5)

    def _partial(self, split: str, entry: dict) -> None:
        atomic_write_json(self.dest / PARTIAL, {"format": FORMAT, "kind": self.kind, "fingerprint": self.fp,
                                                **self.notes(), "splits": {**self.previous, **self.done, split: entry}})

    def split(self, split: str, samples: Callable, size: int, per_shard: int, bounds: list[int] | None = None) -> dict:
        try:
            entry = write_split(self.dest, split, samples, size, per_shard, self.previous.get(split), self.bar.update,
                                bounds=bounds, on_shard=lambda e: self._partial(split, e))
        except BaseException:
            self.bar.leave = False  # erase the bar: the error must be the one line left
            self.bar.close()
            raise
        self.done[split] = entry
        return entry

    def finish(self, manifest: dict) -> dict:
        self.bar.close()
        for split, entry in manifest["splits"].items():
            if entry["size"] == 0:
                raise DataError(f"the {split!r} split of the {self.kind} source is empty; "
                                f"check the source ({SOURCES.get(self.kind, 'see the README')})")
        manifest = {**manifest, "fingerprint": self.fp}
        write_manifest(self.dest, manifest)
        (self.dest / PARTIAL).unlink(missing_ok=True)
        return {"format": FORMAT, **manifest}


def write_image_dataset(kind: str, dest: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                        classes: list[str], per_shard: int, ext: str = "png", extra: dict | None = None) -> dict:
    """Write in-memory (N, H, W, C) uint8 images + labels per split as shards, resumably, with a progress bar.

    float32 arrays (MNIST-1D's signals, as (N, 1, L, C)) are written as .npy members (ext "npy") and the manifest
    records `"dtype": "float32"`: their mean and std are of the raw values, not of values / 255."""
    dest = Path(dest)
    for split, (images, labels) in splits.items():
        if len(labels) == 0:
            raise DataError(f"the {split!r} split of the {kind} source is empty; check the source ({SOURCES.get(kind, '')})")
        bad = (labels < 0) | (labels >= len(classes))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{kind} {split} label {int(labels[i])} of example {i} is outside 0..{len(classes) - 1}; "
                            "the source file is corrupt: download it again")
    dtype = splits["train"][0].dtype
    if dtype not in (np.uint8, np.float32) or any(x.dtype != dtype for x, _ in splits.values()):
        raise DataError(f"{kind}: images must be all uint8 or all float32 arrays, got "
                        f"{', '.join(str(x.dtype) for x, _ in splits.values())}")  # a converter's bug, not the user's
    if dtype == np.float32 and ext != "npy":
        raise DataError(f"{kind}: float32 images are stored as .npy members, not {ext}")
    fp = fingerprint(kind, ext, classes, *[a for pair in splits.values() for a in pair])
    writer = SplitWriter(kind, dest, fp, sum(len(y) for _, y in splits.values()))
    entries = {}
    for split, (images, labels) in splits.items():
        def gen(start, stop, images=images, labels=labels):
            for i in range(start, stop):
                image = images[i][..., 0] if images.shape[-1] == 1 else images[i]  # PIL: grayscale is (H, W)
                yield {"__key__": f"{i:08d}", ext: image, "cls": int(labels[i])}
        entries[split] = writer.split(split, gen, len(labels), per_shard)
    train = splits["train"][0]
    c = train.shape[-1]
    pixels = train.reshape(-1, c)
    if dtype == np.float32:  # raw values: small float datasets, in float64
        mean, std = pixels.mean(0, dtype=np.float64), pixels.std(0, dtype=np.float64)
    else:
        # Per-channel mean and std of the training images in [0, 1]: the reader's normalization.
        # Exact, from per-channel histograms of the uint8 values (no float copy of the whole training set).
        hist = np.stack([np.bincount(pixels[:, ch], minlength=256) for ch in range(c)]).astype(np.float64)
        values = np.arange(256) / 255
        mean = hist @ values / len(pixels)
        std = np.sqrt(np.maximum(hist @ values**2 / len(pixels) - mean**2, 0))
    manifest = {
        "kind": kind, "task": "classification", "image_shape": [c, *train.shape[1:3]], "classes": classes,
        "mean": mean.tolist(), "std": std.tolist(), **({"dtype": "float32"} if dtype == np.float32 else {}),
        **(extra or {}), "splits": entries,
    }
    return writer.finish(manifest)


