"""Webdataset shards plus a manifest: writing (atomic, resumable, checksummed) and reading.

A dataset directory holds `manifest.json` and, per split, shards `SPLIT-000000.tar`, `SPLIT-000001.tar`,
... Each sample is `KEY.png` (or .jpg/.npy) plus `KEY.cls`; keys are the example's index within its
split, zero-padded, so the canonical example order is recoverable from any shard set.

manifest.json:
  {"format": "harness-shards/1", "kind": "cifar10", "task": "classification",
   "image_shape": [3, 32, 32], "classes": [...], "mean": [...], "std": [...],
   "splits": {"train": {"size": 50000, "shards": [{"name": ..., "count": ..., "sha256": ...}, ...]}, ...}}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import webdataset as wds

from harness.errors import DataError
from harness.rundir import atomic_write_json

FORMAT = "harness-shards/1"
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def write_split(
    dest: Path,
    split: str,
    samples: Callable[[int, int], Iterable[dict]],
    size: int,
    per_shard: int,
    previous: dict | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write `size` samples as shards of `per_shard` samples each; return the split's manifest entry.

    `samples(start, stop)` yields webdataset sample dicts for examples [start, stop). A shard already
    listed in `previous` (the old manifest's entry) whose file still matches its checksum is kept, so
    an interrupted conversion resumes where it stopped. Each shard is written to a temp file and renamed.
    """
    old = {s["name"]: s for s in (previous or {}).get("shards", [])}
    shards = []
    for index, start in enumerate(range(0, size, per_shard)):
        stop = min(size, start + per_shard)
        name = shard_name(split, index)
        path = dest / name
        entry = old.get(name)
        if entry and entry["count"] == stop - start and path.is_file() and sha256_file(path) == entry["sha256"]:
            shards.append(entry)
            if progress:
                progress(stop - start)
            continue
        tmp = dest / f".{name}.tmp"
        with wds.TarWriter(str(tmp)) as sink:
            for sample in samples(start, stop):
                sink.write(sample)
                if progress:
                    progress(1)
        tmp.replace(path)
        shards.append({"name": name, "count": stop - start, "sha256": sha256_file(path)})
    return {"size": size, "shards": shards}


def write_manifest(dest: Path, manifest: dict) -> None:
    atomic_write_json(dest / MANIFEST, {"format": FORMAT, **manifest})


def convert_hint(kind: str) -> str:
    if kind == "digits":
        return "create it with `harness data convert digits - DIR`"
    return f"create it with `harness data convert {kind} SRC DIR` (or `harness data synth {kind} DIR` for a synthetic stand-in)"


def read_manifest(path: str | Path, kind: str | None = None) -> dict:
    """Load and check `path/manifest.json`; DataError with a fix for every way it can be wrong."""
    root = Path(path)
    hint = convert_hint(kind or "KIND")
    if not root.exists():
        raise DataError(f"data path {root} does not exist; {hint}")
    file = root / MANIFEST
    if not file.is_file():
        raise DataError(f"data path {root} has no {MANIFEST}, so it is not a shard directory; {hint}")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{file} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); re-run the conversion") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{file} is not a {FORMAT} manifest; re-run the conversion with this version of the harness")
    if kind is not None and manifest.get("kind") != kind:
        raise DataError(
            f"{root} holds {manifest.get('kind')!r} shards but data.name is {kind!r}; "
            f"set data.name={manifest.get('kind')} or point data.path at {kind} shards"
        )
    return manifest


def split_entry(manifest: dict, root: Path, split: str) -> dict:
    entry = manifest.get("splits", {}).get(split)
    if entry is None:
        raise DataError(f"{root / MANIFEST} has no {split!r} split (has: {', '.join(manifest.get('splits', {}))}); re-run the conversion")
    if entry["size"] == 0 or not entry["shards"]:
        raise DataError(f"the {split!r} split in {root} is empty; convert a dataset with at least one {split} example")
    return entry


def verify_shards(root: Path, entry: dict) -> list[Path]:
    """Check every shard of a split exists and matches its checksum; return their paths."""
    paths = []
    for shard in entry["shards"]:
        path = root / shard["name"]
        if not path.is_file():
            raise DataError(f"shard {path} is missing; re-run the conversion into {root}")
        if sha256_file(path) != shard["sha256"]:
            raise DataError(
                f"shard {path} fails its checksum (truncated or corrupt); re-run the conversion into {root} "
                "to rewrite it (complete shards are kept)"
            )
        paths.append(path)
    return paths


def iter_samples(paths: list[Path], handler: Callable | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples (bytes per member) of the shards, in order, in this process."""
    dataset = wds.WebDataset(
        [str(p) for p in paths],
        shardshuffle=False,
        nodesplitter=lambda urls: urls,  # every rank reads every shard (in-memory datasets)
        workersplitter=lambda urls: urls,
        handler=handler or wds.reraise_exception,
        empty_check=False,
    )
    return iter(dataset)
