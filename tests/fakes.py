"""Tiny fakes of the standard distributions, in their exact on-disk formats (file names, containers, encodings):

    cifar-10-python.tar.gz / cifar-100-python.tar.gz   tar.gz of pickled dicts (Python 2 protocol 2, as shipped)
    MNIST idx files                                     big-endian idx headers, optionally gzipped
    ptb.{train,valid,test}.txt                          one sentence per line, words separated by spaces
    ILSVRC2012 train/<wnid>/*.JPEG, val/...             JPEG files in class folders, or flat val/ + a label file
Each returns what a correct conversion must report (counts, classes), so tests compare manifests to inputs.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def cifar_tarball(path: Path, kind: str = "cifar10", per_batch: int = 20, test: int = 30, seed: int = 0) -> dict:
    """cifar-10-python.tar.gz (5 data batches + test_batch + batches.meta) or cifar-100-python.tar.gz
    (train, test, meta), `per_batch` images per training batch (CIFAR-100: 5 x per_batch in `train`)."""
    rng = np.random.default_rng(seed)
    classes = 10 if kind == "cifar10" else 100
    names = [f"class_{i}" for i in range(classes)]

    def batch(n, label):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, size=n).tolist()
        labels[:2] = [0, classes - 1]  # both ends of the label range occur
        return {"batch_label": label, label_key: labels, "data": data,
                "filenames": [f"img_{i}.png" for i in range(n)]}

    label_key = "labels" if kind == "cifar10" else "fine_labels"
    members = {}
    if kind == "cifar10":
        folder = "cifar-10-batches-py"
        for i in range(1, 6):
            members[f"data_batch_{i}"] = batch(per_batch, f"training batch {i} of 5")
        members["test_batch"] = batch(test, "testing batch 1 of 1")
        members["batches.meta"] = {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072}
        train = [members[f"data_batch_{i}"] for i in range(1, 6)]
    else:
        folder = "cifar-100-python"
        members["train"] = batch(5 * per_batch, "training batch 1 of 1")
        members["train"]["coarse_labels"] = [y // 5 for y in members["train"]["fine_labels"]]
        members["test"] = batch(test, "testing batch 1 of 1")
        members["test"]["coarse_labels"] = [y // 5 for y in members["test"]["fine_labels"]]
        members["meta"] = {"fine_label_names": names, "coarse_label_names": [f"super_{i}" for i in range(20)]}
        train = [members["train"]]
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            _add(tar, f"{folder}/{name}", pickle.dumps(obj, protocol=2))
        _add(tar, f"{folder}/readme.html", b"<html></html>")
    first = train[0]["data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    return {"train": sum(len(b[label_key]) for b in train), "test": test, "classes": names,
            "first_train_image": first, "first_train_label": train[0][label_key][0]}


def idx_bytes(array: np.ndarray) -> bytes:
    return b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def mnist_files(folder: Path, train: int = 60, test: int = 40, gz: bool = True, seed: int = 0) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            data = idx_bytes(array)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        out[prefix] = (images, labels)
    return {"train": train, "test": test, "first_train_image": out["train"][0][0], "first_train_label": int(out["train"][1][0])}


def ptb_files(folder: Path, lines: tuple[int, int, int] = (60, 12, 12), vocab: int = 30, seed: int = 0) -> dict:
    """ptb.{train,valid,test}.txt: like the real files, each line starts and ends with a space."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = ["<unk>", "N", "the"] + [f"w{i}" for i in range(vocab - 3)]
    tokens = {}
    for split, n in zip(("train", "valid", "test"), lines):
        text = []
        for _ in range(n):
            text.append(" " + " ".join(rng.choice(words, size=rng.integers(3, 12))) + " \n")
        if split == "train":  # every word occurs in train, as in the real files (rare words are <unk>)
            text.append(" " + " ".join(words) + " \n")
        (folder / f"ptb.{split}.txt").write_text("".join(text))
        tokens[split] = sum(len(line.split()) + 1 for line in text)  # words + <eos> per line
    return {"tokens": tokens, "vocab": vocab + 1}  # + <eos>


def jpeg(rng: np.random.Generator, label: int, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    h, w = (int(v) for v in rng.integers(24, 48, size=2))
    image = np.clip(rng.normal(40 + 50 * label, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(image).convert(mode).save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def imagenet_tree(root: Path, classes: int = 3, train_per_class: int = 10, val_per_class: int = 4,
                  val: str = "folders", seed: int = 0) -> dict:
    """SRC/train/<wnid>/<wnid>_<i>.JPEG and SRC/val/...: val='folders' (class folders), 'csv'
    (flat + LOC_val_solution.csv), 'txt' (flat + val.txt of 'FILENAME INDEX' lines). The first training class
    holds a CMYK JPEG and a PNG named .JPEG, as ILSVRC2012 does."""
    rng = np.random.default_rng(seed)
    wnids = [f"n{1440764 + 1000 * i:08d}" for i in range(classes)]
    for c, wnid in enumerate(wnids):
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        for i in range(train_per_class):
            mode, fmt = ("CMYK", "JPEG") if (c, i) == (0, 0) else ("RGB", "PNG") if (c, i) == (0, 1) else ("RGB", "JPEG")
            (folder / f"{wnid}_{i}.JPEG").write_bytes(jpeg(rng, c, mode, fmt))
    (root / "train" / "README.txt").write_text("not an image: ignored")
    val_dir = root / "val"
    val_dir.mkdir()
    rows, n = [], 0
    for c, wnid in enumerate(wnids):
        for _ in range(val_per_class):
            n += 1
            name = f"ILSVRC2012_val_{n:08d}.JPEG"
            if val == "folders":
                (val_dir / wnid).mkdir(exist_ok=True)
                (val_dir / wnid / name).write_bytes(jpeg(rng, c))
            else:
                (val_dir / name).write_bytes(jpeg(rng, c))
            rows.append((name, wnid, c))
    if val == "csv":
        (root / "LOC_val_solution.csv").write_text(
            "ImageId,PredictionString\n" + "".join(f"{Path(n).stem},{w} 1 2 30 40 {w} 3 4 20 20\n" for n, w, _ in rows))
    elif val == "txt":
        (root / "val.txt").write_text("".join(f"{n} {c}\n" for n, _, c in rows))
    return {"train": classes * train_per_class, "val": classes * val_per_class, "classes": wnids}
