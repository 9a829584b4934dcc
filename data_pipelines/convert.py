"""`harness data convert KIND SRC DEST`: standard distributions -> shards + manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipelines.shards import write_manifest, write_split, read_manifest, MANIFEST


def _previous(dest: Path) -> dict:
    try:
        return read_manifest(dest).get("splits", {}) if (dest / MANIFEST).is_file() else {}
    except Exception:
        return {}


def write_image_dataset(kind: str, dest: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                        classes: list[str], per_shard: int, ext: str = "png", extra: dict | None = None) -> dict:
    """Write in-memory (N, H, W, C) uint8 images + labels per split as shards, resumably, with a progress bar."""
    dest.mkdir(parents=True, exist_ok=True)
    previous = _previous(dest)
    entries = {}
    total = sum(len(y) for _, y in splits.values())
    with tqdm(total=total, desc=f"{kind} -> {dest}", unit="img", disable=None) as bar:
        for split, (images, labels) in splits.items():
            def gen(start, stop, images=images, labels=labels):
                for i in range(start, stop):
                    image = images[i][..., 0] if images.shape[-1] == 1 else images[i]  # PIL: grayscale is (H, W)
                    yield {"__key__": f"{i:08d}", ext: image, "cls": int(labels[i])}
            entries[split] = write_split(dest, split, gen, len(labels), per_shard, previous.get(split), bar.update)
    train = splits["train"][0].astype(np.float64) / 255
    c = train.shape[-1]
    manifest = {
        "kind": kind, "task": "classification", "image_shape": [c, *train.shape[1:3]], "classes": classes,
        "mean": train.reshape(-1, c).mean(0).tolist(), "std": train.reshape(-1, c).std(0).tolist(),
        **(extra or {}), "splits": entries,
    }
    write_manifest(dest, manifest)
    return manifest


def convert_digits(dest: Path, per_shard: int = 1000) -> dict:
    """scikit-learn's shipped 8x8 digits (1797 images), stratified 1347 train / 450 test (random_state 0).
    Pixel values 0..16 are stored as uint8 0..255 grayscale PNGs."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    xtr, xte, ytr, yte = train_test_split(images, digits.target, test_size=450, stratify=digits.target, random_state=0)
    return write_image_dataset("digits", dest, {"train": (xtr, ytr), "test": (xte, yte)},
                               [str(i) for i in range(10)], per_shard, extra={"source": "sklearn.datasets.load_digits"})


CONVERTERS = {"digits": lambda src, dest, per_shard: convert_digits(dest, per_shard or 1000)}


def convert(kind: str, src: str, dest: Path, shard_size: int | None = None) -> dict:
    from harness.errors import DataError

    if kind not in CONVERTERS:
        raise DataError(f"no converter for {kind!r}; choose one of {', '.join(CONVERTERS)}")
    return CONVERTERS[kind](src, Path(dest), shard_size)
