"""ImageNet (ILSVRC2012) as JPEG shards: conversion from the folder layout users have, and a synthetic stand-in.

Source layout (`harness data convert imagenet SRC DEST`):
    SRC/train/<wnid>/*.JPEG           1,281,167 images in 1000 class folders; classes = sorted folder names
    SRC/val/<wnid>/*.JPEG             50,000 images sorted into class folders (e.g. by the common valprep.sh), or
    SRC/val/*.JPEG + a label file     --val-labels FILE, or found as SRC/LOC_val_solution.csv, SRC/val.txt, SRC/val/val.txt
Label files: Kaggle's LOC_val_solution.csv (`ImageId,PredictionString`, the first word of the prediction string is
the wnid) or text lines `FILENAME LABEL` where LABEL is a wnid or a class index into the sorted wnids
(Caffe's val.txt). The devkit's ILSVRC2012_validation_ground_truth.txt (bare ILSVRC2012_IDs, a different class
order kept in meta.mat) is not accepted: sort val/ into folders or use one of the formats above.

Shards: `train-000000.tar`, ... and `val-000000.tar`, ... of about 1 GB each (--shard-bytes), with members
`KEY.jpg` (the original JPEG bytes, untouched) and `KEY.cls` (class index). The training images are shuffled
once (numpy default_rng(0)) before sharding, so that every shard mixes all classes and a streaming reader's
shuffle buffer only has to mix nearby samples; KEY is the image's position in that order. Every image is
checked by a 1/8-scale decode (truncated or corrupt files are named, or left out with --skip-bad); the few
that are not baseline RGB/grayscale JPEGs (ILSVRC2012 holds CMYK JPEGs and a PNG named .JPEG) are re-encoded
as RGB JPEG at quality 95, so that every reader (PIL, libjpeg-turbo, nvjpeg) decodes every shard.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from data_pipelines.formats import SOURCES
from data_pipelines.writer import SplitWriter, fingerprint
from harness.core.errors import DataError

IMAGE_EXTS = (".jpeg", ".jpg", ".png")
DEFAULT_SHARD_BYTES = 10**9
LABEL_FILES = ("LOC_val_solution.csv", "val.txt", "val/val.txt")
# torchvision's ImageNet normalization (per-channel mean and std of the training images in [0, 1]).
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TRAIN_ORDER_SEED = 0


class BadImage(Exception):
    pass


def check_jpeg(data: bytes) -> tuple[bytes, bool]:
    """(JPEG bytes every decoder reads, whether they were re-encoded); BadImage if the image is unreadable."""
    try:
        im = Image.open(io.BytesIO(data))
        if im.format == "JPEG" and im.mode in ("RGB", "L"):
            im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()  # an 8x-reduced decode still reads every byte: truncation and corruption show here
            return data, False
        out = io.BytesIO()
        im.convert("RGB").save(out, "JPEG", quality=95)
        return out.getvalue(), True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"{type(e).__name__}: {e}") from None


@dataclass
class Items:
    """One split's images: a name (for messages), a label, a reader for the bytes, optionally the sizes."""

    names: list[str]
    labels: np.ndarray
    read: Callable[[int], bytes]
    sizes: np.ndarray | None = None


@dataclass
class Stats:
    reencoded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def shard_bounds(sizes: np.ndarray, shard_bytes: int) -> list[int]:
    """Start positions of shards of about `shard_bytes` each (greedy; a shard holds at least one image)."""
    bounds, acc = [0], 0
    for i, size in enumerate(sizes.tolist()):
        if acc and acc + size > shard_bytes:
            bounds.append(i)
            acc = 0
        acc += size
    return bounds


def _sample_writer(items: Items, threads: int, skip_bad: bool, stats: Stats):
    def checked(i: int):
        try:
            return check_jpeg(items.read(i))
        except OSError as e:
            raise BadImage(f"unreadable ({type(e).__name__}: {e})") from None

    def gen(start: int, stop: int):
        # Read and check ahead on a few threads (parallel file systems reward concurrency), write in order.
        with ThreadPoolExecutor(threads) as pool:
            todo = iter(range(start, stop))
            pending = deque((i, pool.submit(checked, i)) for i in (next(todo) for _ in range(min(stop - start, 4 * threads))))
            while pending:
                i, future = pending.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(checked, nxt)))
                try:
                    data, reencoded = future.result()
                except BadImage as e:
                    if not skip_bad:
                        raise DataError(f"image {items.names[i]} is not readable ({e}); replace or delete it, "
                                        "or pass --skip-bad to leave such images out") from None
                    if items.names[i] not in stats.skipped:
                        stats.skipped.append(items.names[i])
                    print(f"harness: warning: skipping unreadable image {items.names[i]} ({e})", file=sys.stderr)
                    continue
                if reencoded and items.names[i] not in stats.reencoded:
                    stats.reencoded.append(items.names[i])
                yield {"__key__": f"{i:08d}", "jpg": data, "cls": int(items.labels[i])}

    return gen


def write_jpeg_dataset(kind: str, dest: Path, splits: dict[str, Items], classes: list[str], source_fingerprint: str,
                       shard_size: int | None = None, shard_bytes: int | None = None, threads: int = 8,
                       skip_bad: bool = False, extra: dict | None = None) -> dict:
    """Write JPEG splits as shards cut by bytes (if the sizes are known) or by count; resumable."""
    writer = SplitWriter(kind, Path(dest), source_fingerprint, sum(len(it.names) for it in splits.values()))
    # Images found bad or re-encoded in shards that an earlier run wrote (and this run keeps).
    stats = Stats(list(writer.old.get("reencoded", [])), list(writer.old.get("skipped", [])))
    writer.notes = lambda: {"reencoded": stats.reencoded, "skipped": stats.skipped}
    entries = {}
    for split, items in splits.items():
        n = len(items.names)
        if n == 0:
            raise DataError(f"the {split!r} split of the {kind} source is empty; check the source ({SOURCES.get(kind, '')})")
        bounds = None
        if shard_size is None and items.sizes is not None:
            bounds = shard_bounds(items.sizes, shard_bytes or DEFAULT_SHARD_BYTES)
        entries[split] = writer.split(split, _sample_writer(items, threads, skip_bad, stats), n, shard_size or n, bounds)
    if stats.skipped:
        print(f"harness: warning: left out {len(stats.skipped)} unreadable images (--skip-bad); listed in the manifest",
              file=sys.stderr)
    manifest = {
        "kind": kind, "task": "classification", "classes": classes, "mean": MEAN, "std": STD, "eval_split": "val",
        **(extra or {}), "reencoded": stats.reencoded, "skipped": stats.skipped, "splits": entries,
    }
    return writer.finish(manifest)


# --------------------------------------------------------------------------------------------- the source tree


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def read_label_file(path: Path, classes: list[str]) -> dict[str, int]:
    """{file stem: class index} from LOC_val_solution.csv or `FILENAME LABEL` lines (wnid or class index)."""
    index = {c: i for i, c in enumerate(classes)}
    labels: dict[str, int] = {}
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"label file {path} is not readable ({type(e).__name__}); pass a text or CSV label file") from None
    if text.startswith("ImageId"):
        rows = [(r["ImageId"], (r.get("PredictionString") or "").split()[:1]) for r in csv.DictReader(io.StringIO(text))]
        pairs = [(name, words[0] if words else "") for name, words in rows]
    else:
        pairs = []
        for n, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise DataError(
                    f"label file {path} line {n}: expected 'FILENAME LABEL', got {line.strip()!r}; (the devkit's "
                    "ILSVRC2012_validation_ground_truth.txt uses another class order: sort val/ into class folders "
                    "or pass LOC_val_solution.csv)")
            pairs.append((parts[0], parts[1]))
    for n, (name, label) in enumerate(pairs, 1):
        if label in index:
            cls = index[label]
        elif label.isdigit() and int(label) < len(classes):
            cls = int(label)
        else:
            raise DataError(f"label file {path}: label {label!r} of {name} is neither one of the {len(classes)} train "
                            f"class folders nor an index 0..{len(classes) - 1}; fix the label file")
        labels[Path(name).stem] = cls
    return labels


def scan_imagenet(src: Path, val_labels: str | None) -> tuple[list[str], dict[str, tuple[list[Path], list[int]]], str]:
    """Classes (sorted train folders), the (files, labels) of train and val, and how val was labelled."""
    train_dir, val_dir = src / "train", src / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise DataError(f"{src} has no {d.name}/ folder; pass {SOURCES['imagenet']}")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{train_dir} has no class folders; pass {SOURCES['imagenet']}")
    train_files, train_labels = [], []
    for i, c in enumerate(classes):
        files = _images_in(train_dir / c)
        train_files += files
        train_labels += [i] * len(files)
    val_classes = sorted(d.name for d in val_dir.iterdir() if d.is_dir())
    if val_classes and val_labels is None:
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise DataError(f"{val_dir / unknown[0]} is not a class of {train_dir}; remove it or fix the folder name")
        val_files, val_y = [], []
        for c in val_classes:
            files = _images_in(val_dir / c)
            val_files += files
            val_y += [classes.index(c)] * len(files)
        return classes, {"train": (train_files, train_labels), "val": (val_files, val_y)}, "class folders"
    label_path = Path(val_labels) if val_labels else next((src / f for f in LABEL_FILES if (src / f).is_file()), None)
    if label_path is None or not label_path.is_file():
        raise DataError(
            f"{val_dir} has no class folders and no label file was found ({label_path or ', '.join(LABEL_FILES)}); "
            "pass --val-labels FILE (LOC_val_solution.csv or 'FILENAME WNID' lines)")
    labels = read_label_file(label_path, classes)
    val_files = _images_in(val_dir)
    missing = [p.name for p in val_files if p.stem not in labels]
    if missing:
        raise DataError(f"{val_dir / missing[0]} has no label in {label_path} ({len(missing)} images lack one); "
                        "fix the label file or move those images out of val/")
    return classes, {"train": (train_files, train_labels), "val": (val_files, [labels[p.stem] for p in val_files])}, str(label_path)


def _stats(paths: list[Path], threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Sizes (to cut shards by bytes) and modification times (part of the source fingerprint) of the files."""
    with ThreadPoolExecutor(threads) as pool:
        stats = np.array([(st.st_size, st.st_mtime_ns) for st in pool.map(os.stat, paths)], dtype=np.int64).reshape(-1, 2)
    return stats[:, 0], stats[:, 1]


def convert_imagenet(src: Path, dest: Path, shard_size: int | None = None, shard_bytes: int | None = None,
                     val_labels: str | None = None, skip_bad: bool = False, threads: int = 8) -> dict:
    classes, found, val_source = scan_imagenet(src, val_labels)
    splits, stamps = {}, []
    for split, (files, labels) in found.items():
        files, labels = list(files), np.asarray(labels, dtype=np.int64)
        if split == "train":  # one fixed shuffle, so that every shard mixes all classes
            perm = np.random.default_rng(TRAIN_ORDER_SEED).permutation(len(files))
            files, labels = [files[i] for i in perm], labels[perm]
        sizes, mtimes = _stats(files, threads)
        stamps.append(mtimes)
        splits[split] = Items([str(p) for p in files], labels, lambda i, files=files: files[i].read_bytes(),
                              sizes if shard_size is None else None)
    fp = fingerprint("imagenet", classes, skip_bad, TRAIN_ORDER_SEED,
                     *[(it.names, it.labels, it.sizes if it.sizes is not None else "by count") for it in splits.values()],
                     *stamps)
    extra = {"source": {"path": str(src), "val_labels": val_source, "train_order": f"numpy default_rng({TRAIN_ORDER_SEED}) permutation"}}
    return write_jpeg_dataset("imagenet", dest, splits, classes, fp, shard_size, shard_bytes, threads, skip_bad, extra)


# --------------------------------------------------------------------------------------------- synthetic stand-in


def synthetic_jpeg(seed: int, split: str, index: int, label: int, num_classes: int,
                   min_size: int = 40, max_size: int = 96) -> bytes:
    """A small JPEG of class `label`: the class's colour layout plus noise, of random size; some grayscale."""
    rng = np.random.default_rng([seed, 1 if split == "train" else 2, index])
    h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    template = np.random.default_rng([seed, 0, label]).uniform(30, 225, size=(3, 3, 3))
    image = template.repeat(-(-h // 3), axis=0).repeat(-(-w // 3), axis=1)[:h, :w]
    image = np.clip(image + rng.normal(0, 30, size=image.shape), 0, 255).astype(np.uint8)
    pil = Image.fromarray(image)
    if index % 17 == 5:
        pil = pil.convert("L")
    out = io.BytesIO()
    pil.save(out, "JPEG", quality=90)
    return out.getvalue()


def synth_imagenet(dest: Path, train: int, val: int, seed: int = 0, num_classes: int = 4, per_shard: int = 64) -> dict:
    """Synthetic JPEG shards in the exact ImageNet shard format (a few classes, small images): for tests."""
    classes = [f"n{90000000 + i:08d}" for i in range(num_classes)]
    splits = {}
    for split, n in (("train", train), ("val", val)):
        labels = np.random.default_rng([seed, 3 if split == "train" else 4]).integers(0, num_classes, size=n)
        splits[split] = Items([f"synthetic {split} {i}" for i in range(n)], labels,
                              lambda i, split=split, labels=labels: synthetic_jpeg(seed, split, i, int(labels[i]), num_classes))
    fp = fingerprint("synthetic imagenet", seed, num_classes, train, val)
    return write_jpeg_dataset("imagenet", dest, splits, classes, fp, shard_size=per_shard, threads=2,
                              extra={"synthetic": True})
