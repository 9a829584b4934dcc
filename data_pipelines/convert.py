"""`harness data convert KIND SRC DEST`: the standard distributions, as users have them, -> shards + manifest.

    cifar10   cifar-10-python.tar.gz (or the extracted cifar-10-batches-py/): pickled data_batch_1..5, test_batch
    cifar100  cifar-100-python.tar.gz (or the extracted cifar-100-python/): pickled train, test, meta (fine labels)
    mnist     a folder with train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
              t10k-labels-idx1-ubyte, each optionally .gz
    ptb       a folder with ptb.train.txt, ptb.valid.txt, ptb.test.txt (simple-examples/data of Mikolov's tarball)
    imagenet  an ILSVRC2012 folder: train/<wnid>/*.JPEG, and val/<wnid>/*.JPEG or val/*.JPEG plus a label file
              (see data_pipelines/imagenet.py)
    digits    `-`: scikit-learn ships it
    mnist1d   `-`: the `mnist1d` package generates it (Greydanus 2020), offline

Images become PNG members (CIFAR, MNIST: lossless) or keep their JPEG bytes (ImageNet); MNIST-1D's float
signals become float32 .npy members of shape (1, 1, 40) (C, H, W: one channel, one row); PTB becomes the
token-stream format of data_pipelines/tokens.py. Re-running the same command keeps every shard that is
complete and matches its checksum (and was made from the same source), and rewrites the rest.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipelines.formats import DEFAULT_SHARD_SIZE, SOURCES
from data_pipelines.writer import fingerprint, previous_splits, write_image_dataset
from harness.core.errors import DataError

# --------------------------------------------------------------------------------------------- digits


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


# --------------------------------------------------------------------------------------------- MNIST-1D

MNIST1D_PIN = "mnist1d==0.0.2.post1"  # pyproject.toml pins it: the generator's output depends on its code


def read_mnist1d() -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """MNIST-1D (Greydanus 2020, arXiv 2011.14439) from the `mnist1d` package's generator with its default
    arguments: 5000 signals of length 40, 10 classes, the package's own 4000 train / 1000 test split (seed 42).
    Generated offline (the package can also download its pickle; we never do). Returns the splits as float32
    (N, 1, 40, 1) arrays (H, W, C: one row, 40 positions, one channel) plus labels, and the arguments used."""
    import random

    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise DataError(f"mnist1d needs the mnist1d package ({e}); install it: pip install {MNIST1D_PIN}") from None
    args = get_dataset_args()
    # make_dataset seeds numpy's and Python's global generators (set_seed): restore them afterwards.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    splits = {}
    for split, (xk, yk) in (("train", ("x", "y")), ("test", ("x_test", "y_test"))):
        x, y = np.asarray(data[xk]), np.asarray(data[yk]).astype(np.int64)
        if x.ndim != 2 or len(x) != len(y) or not np.isfinite(x).all():
            raise DataError(f"the mnist1d generator returned {split} signals of shape {x.shape} with {len(y)} labels "
                            f"(finite: {bool(np.isfinite(x).all())}), not N x length with N labels; reinstall {MNIST1D_PIN}")
        splits[split] = (x.astype(np.float32)[:, None, :, None], y)
    source = {k: v for k, v in vars(args).items() if k != "url"}
    return splits, source


def convert_mnist1d(dest: Path, per_shard: int = 1000) -> dict:
    splits, args = read_mnist1d()
    return write_image_dataset("mnist1d", dest, splits, [str(i) for i in range(10)], per_shard, ext="npy",
                               extra={"source": f"{MNIST1D_PIN} make_dataset (generated offline)",
                                      "generator_args": args})


# --------------------------------------------------------------------------------------------- CIFAR

# (folder inside the tarball, train members, test members, meta member, label key, class-name key)
CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
                "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}


class _CifarUnpickler(pickle.Unpickler):
    """The CIFAR batches are Python 2 pickles of dicts of lists and numpy arrays. Refuse anything else:
    unpickling a file from the internet must not run arbitrary code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy.core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")
        if module.startswith("numpy.core") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core" + module[len("numpy.core"):]  # the batches were pickled by numpy 1
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict:
    try:
        # latin1: Python 2 `str` values (keys, class names, the pixel buffer) load as they were (torchvision does the same).
        obj = _CifarUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the member is not a CIFAR batch
        raise DataError(f"{where} is not a readable CIFAR batch ({type(e).__name__}: {e}); download the tarball again") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where} is not a CIFAR batch (a pickled dict); download the tarball again")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_members(src: Path, folder: str, names: list[str], kind: str) -> dict[str, bytes]:
    """The named batch files from the tarball or from an extracted folder."""
    out = {}
    if src.is_file():
        try:
            with tarfile.open(src, "r:*") as tar:
                for name in names:
                    try:
                        member = tar.extractfile(f"{folder}/{name}")
                    except KeyError:
                        member = None
                    if member is None:
                        raise DataError(f"{src} has no member {folder}/{name}, so it is not the {kind} python tarball; "
                                        f"pass {SOURCES[kind]}")
                    out[name] = member.read()
        except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile) as e:
            raise DataError(f"{src} is not a readable tar.gz ({type(e).__name__}: {e}); it is truncated or corrupt: "
                            "download it again") from None
        return out
    for name in names:
        path = next((p for p in (src / name, src / folder / name) if p.is_file()), None)
        if path is None:
            raise DataError(f"{src} has no {name} (nor {folder}/{name}); pass {SOURCES[kind]}")
        out[name] = path.read_bytes()
    return out


def read_cifar(kind: str, src: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    folder, train, test, meta, label_key, names_key = CIFAR[kind]
    raw = _cifar_members(src, folder, train + test + [meta], kind)
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in _unpickle(raw[meta], f"{src}:{meta}").get(names_key, [])]
    if not classes:
        raise DataError(f"{src}:{folder}/{meta} lacks {names_key!r}; it is not the {kind} python tarball: download it again")
    splits = {}
    for split, members in (("train", train), ("test", test)):
        xs, ys = [], []
        for name in members:
            where = f"{src}:{folder}/{name}"
            batch = _unpickle(raw[name], where)
            try:
                data = np.asarray(batch["data"], dtype=np.uint8)
                labels = np.asarray(batch[label_key], dtype=np.int64)
            except KeyError as e:
                raise DataError(f"{where} lacks {e}; it is not a {kind} batch: download the tarball again") from None
            if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
                raise DataError(f"{where} holds data of shape {data.shape} with {len(labels)} labels, not N x 3072 "
                                "with N labels; download the tarball again")
            bad = (labels < 0) | (labels >= len(classes))
            if bad.any():
                raise DataError(f"{where}: label {labels[bad][0]} is outside 0..{len(classes) - 1}; download the tarball again")
            # Each row is 1024 red, 1024 green, 1024 blue values of a 32x32 image, row-major.
            xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(labels)
        splits[split] = (np.concatenate(xs), np.concatenate(ys))
    return splits, classes


def convert_cifar(kind: str, src: Path, dest: Path, per_shard: int) -> dict:
    splits, classes = read_cifar(kind, src)
    return write_image_dataset(kind, dest, splits, classes, per_shard, extra={"source": str(src)})


# --------------------------------------------------------------------------------------------- MNIST

MNIST = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find_mnist(src: Path, base: str) -> Path:
    # Also the variants in the wild: '.idx3-ubyte' (Kaggle) and torchvision's MNIST/raw/ folder.
    names = [base, base + ".gz", base.replace("-idx", ".idx"), base.replace("-idx", ".idx") + ".gz"]
    for folder in (src, src / "raw", src / "MNIST" / "raw"):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise DataError(f"{src} has no {base}(.gz); pass {SOURCES['mnist']}")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file (LeCun's format): magic 0x0000 0x08 (ubyte) ndim, big-endian int32 dims, the bytes."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"{path} is not readable ({type(e).__name__}: {e}); it is truncated or corrupt: download it again") from None
    if len(raw) < 4 + 4 * ndim or raw[:3] != b"\0\0\x08" or raw[3] != ndim:
        raise DataError(f"{path} is not an idx file of {ndim}-dimensional unsigned bytes (bad magic {raw[:4].hex()}); "
                        "download it again")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise DataError(f"{path} holds {len(body)} data bytes but its header announces {dims} = {int(np.prod(dims))}; "
                        "it is truncated: download it again")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def read_mnist(src: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if not src.is_dir():
        raise DataError(f"MNIST source {src} is not a folder; pass {SOURCES['mnist']}")
    splits = {}
    for split, (images_name, labels_name) in MNIST.items():
        images_path, labels_path = _find_mnist(src, images_name), _find_mnist(src, labels_name)
        images, labels = read_idx(images_path, 3), read_idx(labels_path, 1).astype(np.int64)
        if len(images) != len(labels):
            raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; "
                            "download both again")
        if len(labels) and labels.max() > 9:
            raise DataError(f"{labels_path}: label {labels.max()} is outside 0..9; download it again")
        splits[split] = (images[..., None], labels)
    return splits


def convert_mnist(src: Path, dest: Path, per_shard: int) -> dict:
    return write_image_dataset("mnist", dest, read_mnist(src), [str(i) for i in range(10)], per_shard,
                               extra={"source": str(src)})


# --------------------------------------------------------------------------------------------- PTB

PTB_FILES = {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"}


def ptb_words(path: Path) -> list[str]:
    """The token stream of one PTB file: every line's words followed by `<eos>` (Zaremba et al.'s reader,
    `data:gsub('\\n', '<eos>'):split()`; spaces around it so a line without a trailing blank still splits)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not a readable text file ({type(e).__name__}); pass {SOURCES['ptb']}") from None
    return text.replace("\n", " <eos> ").split()


def read_ptb(src: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    folder = next((f for f in (src, src / "data", src / "simple-examples" / "data") if (f / PTB_FILES["train"]).is_file()), None)
    if folder is None:
        raise DataError(f"{src} has no {PTB_FILES['train']}; pass {SOURCES['ptb']}")
    words = {}
    for split, name in PTB_FILES.items():
        if not (folder / name).is_file():
            raise DataError(f"{folder} has no {name}; pass {SOURCES['ptb']}")
        words[split] = ptb_words(folder / name)
        if not words[split]:
            raise DataError(f"{folder / name} is empty; the {split!r} split needs text: download the PTB files again")
    # Ids in order of first appearance in the training text, as Zaremba et al.'s data.lua assigns them.
    vocab = list(dict.fromkeys(words["train"]))
    ids = {w: i for i, w in enumerate(vocab)}
    streams = {}
    for split, toks in words.items():
        try:
            streams[split] = np.fromiter((ids[w] for w in toks), dtype=np.int32, count=len(toks))
        except KeyError as e:
            raise DataError(f"{folder / PTB_FILES[split]}: word {e.args[0]!r} is not in the training vocabulary "
                            "(the standard files map rare words to <unk>); use the unmodified PTB files") from None
    return streams, vocab


def convert_ptb(src: Path, dest: Path, per_shard: int) -> dict:
    from data_pipelines.tokens import write_token_dataset

    streams, vocab = read_ptb(src)
    fp = fingerprint("ptb", vocab, *streams.values(), per_shard)
    dest.mkdir(parents=True, exist_ok=True)
    with tqdm(total=1, desc=f"ptb -> {dest}", unit="dataset", mininterval=0.1 if sys.stderr.isatty() else 60) as bar:
        manifest = write_token_dataset("ptb", dest, streams, vocab, per_shard=per_shard,
                                       previous=previous_splits(dest, fp),
                                       extra={"source": str(src), "fingerprint": fp})
        bar.update(1)
    return manifest


# --------------------------------------------------------------------------------------------- dispatch


def convert(kind: str, src: str, dest: Path, shard_size: int | None = None, shard_bytes: int | None = None,
            val_labels: str | None = None, skip_bad: bool = False, workers: int = 8) -> dict:
    """Convert one standard distribution; DataError (one line, with the fix) for every bad input."""
    if kind not in SOURCES:
        raise DataError(f"no converter for {kind!r}; choose one of {', '.join(SOURCES)}")
    if shard_size is not None and shard_bytes is not None:
        raise DataError("give at most one of --shard-size and --shard-bytes")
    if shard_bytes is not None and kind != "imagenet":
        raise DataError(f"--shard-bytes applies to imagenet (JPEGs of varying size); for {kind} use --shard-size")
    dest = Path(dest)
    if kind in ("digits", "mnist1d") and src != "-":  # embedded (scikit-learn's digits) or generated: no source
        how = "embedded in scikit-learn" if kind == "digits" else "generated"
        raise DataError(f"{kind} is {how}, not read: pass '-' as SRC (got {src!r}), "
                        f"as in `harness data convert {kind} - DIR`")
    if kind == "digits":
        return convert_digits(dest, shard_size or DEFAULT_SHARD_SIZE["digits"])
    if kind == "mnist1d":
        return convert_mnist1d(dest, shard_size or DEFAULT_SHARD_SIZE["mnist1d"])
    path = Path(src)
    if not path.exists():
        raise DataError(f"{kind} source {path} does not exist; pass {SOURCES[kind]}")
    if kind == "imagenet":
        from data_pipelines.imagenet import convert_imagenet

        return convert_imagenet(path, dest, shard_size=shard_size, shard_bytes=shard_bytes, val_labels=val_labels,
                                skip_bad=skip_bad, threads=workers)
    per_shard = shard_size or DEFAULT_SHARD_SIZE[kind]
    if kind in CIFAR:
        return convert_cifar(kind, path, dest, per_shard)
    if kind == "mnist":
        return convert_mnist(path, dest, per_shard)
    return convert_ptb(path, dest, per_shard)
