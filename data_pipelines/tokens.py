"""Token-stream datasets (PTB) as shards.

Each split is ONE stream of token ids (the corpus, with `<eos>` ending every line, as in Zaremba et al.),
cut into chunks of at most `chunk` tokens: sample `KEY.npy` holds chunk KEY (int32), and concatenating the
chunks in key order restores the stream. The manifest adds `vocab` (id -> word) and `vocab_size`;
a split's `size` counts tokens.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from data_pipelines.shards import iter_samples, split_entry, verify_shards, write_manifest, write_split
from harness.core.errors import DataError


def write_token_dataset(kind: str, dest: Path, splits: dict[str, np.ndarray], vocab: list[str],
                        chunk: int = 100_000, per_shard: int = 10, previous: dict | None = None,
                        extra: dict | None = None) -> dict:
    """Write token-id streams per split; `per_shard` chunks per shard. Returns the manifest."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    entries = {}
    for split, ids in splits.items():
        ids = np.asarray(ids, dtype=np.int32)
        chunks = [ids[i : i + chunk] for i in range(0, len(ids), chunk)]

        def gen(start, stop, chunks=chunks):
            for i in range(start, stop):
                yield {"__key__": f"{i:08d}", "npy": chunks[i]}

        entry = write_split(dest, split, gen, len(chunks), per_shard, (previous or {}).get(split))
        entries[split] = {**entry, "size": int(len(ids)), "chunks": len(chunks)}
    manifest = {"kind": kind, "task": "language_model", "vocab": list(vocab), "vocab_size": len(vocab),
                **(extra or {}), "splits": entries}
    write_manifest(dest, manifest)
    return manifest


def load_tokens(root: Path, manifest: dict, split: str) -> torch.Tensor:
    """A split's whole token stream as int64, checked against the manifest and the vocabulary."""
    entry = split_entry(manifest, root, split)
    chunks: dict[int, np.ndarray] = {}
    for sample in iter_samples(verify_shards(root, entry)):
        try:
            chunks[int(sample["__key__"])] = np.load(io.BytesIO(sample["npy"]))
        except (KeyError, ValueError, OSError) as e:
            raise DataError(f"sample {sample.get('__key__')} of shard {sample.get('__url__')} is unreadable ({e}); "
                            f"re-run the conversion into {root}") from None
    if sorted(chunks) != list(range(entry["chunks"])):
        raise DataError(f"the {split!r} split in {root} lacks token chunks; re-run the conversion")
    ids = torch.from_numpy(np.concatenate([chunks[i] for i in range(entry["chunks"])]).astype(np.int64))
    if len(ids) != entry["size"]:
        raise DataError(f"the {split!r} split in {root} has {len(ids)} tokens, the manifest says {entry['size']}; re-convert")
    vocab = manifest["vocab_size"]
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab):
        raise DataError(f"the {split!r} split in {root} has token ids outside 0..{vocab - 1}; re-convert")
    return ids


def synth_tokens(dest: Path, train: int, test: int, vocab_size: int = 200, seed: int = 0) -> dict:
    """A synthetic PTB-format corpus: a random sparse Markov chain over `vocab_size` words (learnable)."""
    rng = np.random.default_rng([seed, 7])
    successors = rng.integers(0, vocab_size, size=(vocab_size, 4))

    def stream(n, tag):
        r = np.random.default_rng([seed, tag])
        out = np.empty(n, dtype=np.int32)
        cur = 0
        for i in range(n):
            cur = successors[cur, r.integers(0, 4)] if r.random() < 0.9 else r.integers(0, vocab_size)
            out[i] = cur
        return out

    vocab = ["<eos>"] + [f"w{i}" for i in range(1, vocab_size)]
    splits = {"train": stream(train, 1), "valid": stream(test, 2), "test": stream(test, 3)}
    return write_token_dataset("ptb", dest, splits, vocab, chunk=max(1, min(100_000, train // 4)),
                               extra={"synthetic": True})
