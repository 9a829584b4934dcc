"""Small synthetic datasets in the exact shard format of the real ones, for tests and smoke runs.

Images of class c are a fixed random low-frequency template for c plus per-image noise, so a model can
learn them (the loss falls) but not instantly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipelines.shards import write_manifest, write_split

IMAGE_KINDS = {"cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100), "mnist": ((1, 28, 28), 10)}


def _images(kind: str, seed: int, split: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    (c, h, w), classes = IMAGE_KINDS[kind]
    templates = np.random.default_rng([seed, 0]).uniform(40, 215, size=(classes, 4, 4, c))
    templates = templates.repeat(-(-h // 4), axis=1).repeat(-(-w // 4), axis=2)[:, :h, :w]  # (classes, h, w, c)
    rng = np.random.default_rng([seed, 1 if split == "train" else 2, start])
    labels = rng.integers(0, classes, size=stop - start)
    noise = rng.normal(0, 48, size=(stop - start, h, w, c))
    return np.clip(templates[labels] + noise, 0, 255).astype(np.uint8), labels


def synth(kind: str, dest: str | Path, train: int, test: int, seed: int = 0, per_shard: int = 1000) -> dict:
    dest = Path(dest)
    if kind == "ptb":
        from data_pipelines.tokens import synth_tokens

        return synth_tokens(dest, train, test, seed=seed)
    if kind == "imagenet":
        from data_pipelines.imagenet import synth_imagenet

        return synth_imagenet(dest, train, test, seed=seed)
    if kind not in IMAGE_KINDS:
        raise ValueError(kind)
    dest.mkdir(parents=True, exist_ok=True)
    (c, h, w), classes = IMAGE_KINDS[kind]

    def samples(split):
        def gen(start, stop):
            images, labels = _images(kind, seed, split, start, stop)
            for i, (img, lab) in enumerate(zip(images, labels)):
                yield {"__key__": f"{start + i:08d}", "png": img[..., 0] if c == 1 else img, "cls": int(lab)}
        return gen

    splits = {s: write_split(dest, s, samples(s), n, per_shard) for s, n in (("train", train), ("test", test))}
    images, _ = _images(kind, seed, "train", 0, min(train, 1000))
    manifest = {
        "kind": kind, "task": "classification", "image_shape": [c, h, w],
        "classes": [f"class{i}" for i in range(classes)],
        "mean": (images.mean(axis=(0, 1, 2)) / 255).tolist(), "std": (images.std(axis=(0, 1, 2)) / 255).tolist(),
        "synthetic": True, "splits": splits,
    }
    write_manifest(dest, manifest)
    return manifest
