"""Webdataset shards plus a manifest: writing (atomic, resumable, checksummed) and reading.

A dataset directory holds `manifest.json` and, per split, shards `SPLIT-000000.tar`, `SPLIT-000001.tar`,
... Each sample is `KEY.png` (or .jpg/.npy) plus `KEY.cls`; keys are the example's index within its
split, zero-padded, so the canonical example order is recoverable from any shard set.

manifest.json:
  {"format": "harness-shards/1", "kind": "cifar10", "task": "classification",
   "image_shape": [3, 32, 32], "classes": [...], "mean": [...], "std": [...], "source": {...},
   "splits": {"train": {"size": 50000, "shards": [{"name": ..., "count": ..., "bytes": ..., "sha256": ...,
                                                    "start": ..., "stop": ...}, ...]}, ...}}

`start`/`stop` are the source positions a shard was made from (`count` may be smaller when a converter
skipped unreadable inputs), `bytes` the file size (a cheap truncation check for streaming readers).
While a conversion runs, `.manifest.partial.json` records the shards finished so far, so an interrupted
conversion resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import webdataset as wds

from data_pipelines.formats import CONVERT_SRC
from harness.core.errors import DataError
from harness.core.io import atomic_write_json

FORMAT = "harness-shards/1"
MANIFEST = "manifest.json"
PARTIAL = ".manifest.partial.json"
# A manifest holds under 200 bytes per shard (name, count, bytes, sha256, start, stop): 64 MiB is over 300,000
# shards. A larger file is not one the converters wrote, and is refused unread.
MAX_MANIFEST_BYTES = 64 * 2**20


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
    bounds: list[int] | None = None,
    on_shard: Callable[[dict], None] | None = None,
) -> dict:
    """Write `size` samples as shards of `per_shard` samples each; return the split's manifest entry.

    `samples(start, stop)` yields webdataset sample dicts for source positions [start, stop) (it may
    yield fewer, skipping bad inputs). `bounds`, if given, are the shard start positions instead of
    multiples of `per_shard` (e.g. cut by bytes). A shard already listed in `previous` (the old manifest's
    entry) for the same positions whose file still matches its size and checksum is kept, so an
    interrupted conversion resumes where it stopped. Each shard is written to a temp file and renamed;
    `on_shard(entry so far)` runs after each.
    """
    old = {s["name"]: s for s in (previous or {}).get("shards", [])}
    starts = list(bounds) if bounds is not None else list(range(0, size, per_shard))
    shards = []
    for index, start in enumerate(starts):
        stop = starts[index + 1] if index + 1 < len(starts) else size
        name = shard_name(split, index)
        path = dest / name
        entry = old.get(name)
        if entry and _reusable(entry, path, start, stop):
            shards.append(entry)
            if progress:
                progress(stop - start)
        else:
            tmp = dest / f".{name}.tmp"
            count = 0
            with wds.TarWriter(str(tmp), mtime=0) as sink:  # fixed mtime: the same input gives the same bytes
                for sample in samples(start, stop):
                    sink.write(sample)
                    count += 1
                    if progress:
                        progress(1)
            if progress and count < stop - start:
                progress(stop - start - count)
            tmp.replace(path)
            shards.append({"name": name, "count": count, "bytes": path.stat().st_size, "sha256": sha256_file(path),
                           "start": start, "stop": stop})
        if on_shard:
            on_shard({"size": sum(s["count"] for s in shards), "shards": list(shards)})
    return {"size": sum(s["count"] for s in shards), "shards": shards}


def _reusable(entry: dict, path: Path, start: int, stop: int) -> bool:
    same_range = (entry.get("start"), entry.get("stop")) == (start, stop) if "start" in entry else entry["count"] == stop - start
    if not same_range or not path.is_file():
        return False
    if "bytes" in entry and path.stat().st_size != entry["bytes"]:
        return False
    return sha256_file(path) == entry["sha256"]


def write_manifest(dest: Path, manifest: dict) -> None:
    atomic_write_json(dest / MANIFEST, {"format": FORMAT, **manifest})


def convert_hint(kind: str) -> str:
    if kind in ("digits", "mnist1d"):
        return f"create it with `harness data convert {kind} - DIR`"
    src = CONVERT_SRC.get(kind, "SRC")
    return f"create it with `harness data convert {kind} {src} DIR` (or `harness data synth {kind} DIR` for a synthetic stand-in)"


def read_manifest(path: str | Path, kind: str | None = None) -> dict:
    """Load and check `path/manifest.json`; DataError with a fix for every way it can be wrong."""
    root = Path(path)
    hint = convert_hint(kind or "KIND")
    if not root.exists():
        where = "" if root.is_absolute() else f" (relative to the current directory {Path.cwd()})"
        raise DataError(f"data path {root}{where} does not exist; {hint}, or give an absolute data.path")
    file = root / MANIFEST
    if not file.is_file():
        raise DataError(f"data path {root} has no {MANIFEST}, so it is not a shard directory; {hint}")
    if file.stat().st_size > MAX_MANIFEST_BYTES:
        raise DataError(f"{file} is {file.stat().st_size:,} bytes, more than the {MAX_MANIFEST_BYTES:,} a manifest has; "
                        "re-run the conversion")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{file} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); re-run the conversion") from None
    except RecursionError:  # json nests one Python frame per level
        raise DataError(f"{file} is nested too deeply to be a manifest; re-run the conversion") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{file} is not a {FORMAT} manifest; re-run the conversion with this version of the harness")
    problem = manifest_problem(manifest)
    if problem:
        raise DataError(f"{file}: {problem}; re-run the conversion into {root} (or restore the manifest it wrote)")
    if kind is not None and manifest.get("kind") != kind:
        raise DataError(
            f"{root} holds {manifest.get('kind')!r} shards but data.name is {kind!r}; "
            f"set data.name={manifest.get('kind')} or point data.path at {kind} shards"
        )
    return manifest


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_plain_name(name: Any) -> bool:
    """A shard name is a file name inside the data directory: no directory part, no `..`, not absolute, so a
    manifest cannot make the harness read (or a converter overwrite) a file elsewhere."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def manifest_problem(manifest: dict) -> str | None:
    """What is structurally wrong with a manifest (the keys every reader indexes), or None."""
    for key in ("kind", "task"):
        if not isinstance(manifest.get(key), str):
            return f"{key} is {manifest.get(key)!r}, not a name"
    shape = manifest.get("image_shape")
    if shape is not None and not (isinstance(shape, list) and 1 <= len(shape) <= 4
                                  and all(_is_count(d) and d > 0 for d in shape)):
        return f"image_shape is {shape!r}, not a list of positive sizes such as [3, 32, 32]"
    if "classes" in manifest and not isinstance(manifest["classes"], list):
        return f"classes is {manifest['classes']!r}, not a list of class names"
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or "train" not in splits:
        return f"splits is {str(splits)[:60]!r}, not a mapping of split names (with a 'train' split) to their shards"
    for split, entry in splits.items():
        if not (isinstance(entry, dict) and _is_count(entry.get("size")) and isinstance(entry.get("shards"), list)):
            return f"split {split!r} lacks a size and a list of shards"
        for shard in entry["shards"]:
            if not isinstance(shard, dict) or not _is_plain_name(shard.get("name")):
                name = shard.get("name") if isinstance(shard, dict) else shard
                return f"split {split!r}: shard name {name!r} is not a file name inside the data directory"
            sha = shard.get("sha256")
            if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
                return f"shard {shard['name']}: sha256 is {sha!r}, not a 64-digit hex checksum"
            if not _is_count(shard.get("count", 0)) or not _is_count(shard.get("bytes", 0)):
                return f"shard {shard['name']}: count and bytes must be non-negative integers"
    return None


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
        if "bytes" in shard and path.stat().st_size != shard["bytes"]:
            raise DataError(
                f"shard {path} is truncated or corrupt ({path.stat().st_size} bytes, the manifest says {shard['bytes']}); "
                f"re-run the conversion into {root} to rewrite it (complete shards are kept)"
            )
        if sha256_file(path) != shard["sha256"]:
            raise DataError(
                f"shard {path} fails its checksum (truncated or corrupt); re-run the conversion into {root} "
                "to rewrite it (complete shards are kept)"
            )
        paths.append(path)
    return paths


def check_shard_files(root: Path, entry: dict) -> list[Path]:
    """The cheap check a streaming reader can afford at start-up: every shard exists and has its size.
    (Checksums are verified while a whole shard streams through; `harness data verify` checks them all.)"""
    paths = []
    for shard in entry["shards"]:
        path = root / shard["name"]
        if not path.is_file():
            raise DataError(f"shard {path} is missing; re-run the conversion into {root}")
        size = path.stat().st_size
        if "bytes" in shard and size != shard["bytes"]:
            raise DataError(
                f"shard {path} is truncated or corrupt ({size} bytes, the manifest says {shard['bytes']}); "
                f"re-run the conversion into {root} to rewrite it (complete shards are kept)"
            )
        paths.append(path)
    return paths


def iter_samples(paths: list[Path], handler: Callable | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples (bytes per member) of the shards, in order, in this process. A shard webdataset cannot group
    into samples (two members of one sample with the same name: `0001.png` twice) is a DataError."""
    dataset = wds.WebDataset(
        [str(p) for p in paths],
        shardshuffle=False,
        nodesplitter=lambda urls: urls,  # every rank reads every shard (in-memory datasets)
        workersplitter=lambda urls: urls,
        handler=handler or wds.reraise_exception,
        empty_check=False,
    )
    return _named_errors(iter(dataset), paths)


def _named_errors(samples: Iterator[dict[str, Any]], paths: list[Path]) -> Iterator[dict[str, Any]]:
    """The samples; webdataset's ValueError (duplicate member names, tarfile's own errors) as a DataError."""
    import tarfile

    while True:
        try:
            sample = next(samples)
        except StopIteration:
            return
        except (ValueError, tarfile.TarError) as e:
            where = paths[0].parent if paths else "the data directory"
            raise DataError(f"a shard in {where} is malformed ({str(e).splitlines()[0][:200]}); "
                            f"re-run the conversion into {where}") from None
        yield sample
