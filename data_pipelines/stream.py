"""Streaming reader for JPEG shards too large for memory (ImageNet): webdataset pieces -> loader workers.

Every rank runs K loader workers (`data.workers`; K = 0 reads in the training process, counted as one).
The W x K workers of a run are *slots* s = rank K + k. Per stream epoch e:

  resampled (data.resampled: true, the default): slot s draws whole shards with replacement
      (webdataset's ResampledShards, seeded by (seed, e, s));
  not resampled: the shards, permuted by (seed, e) identically on every rank, are read as one stream of
      T examples, and slot s reads the positions [s T / (W K), (s+1) T / (W K)) of it, so the slots'
      parts are disjoint and differ in size by at most one example (a part starting inside a shard seeks to
      its first sample by walking the tar headers: no worker reads bytes outside its part).

Each slot passes its samples through a shuffle buffer (`data.shuffle_buffer`, seeded by (seed, e, s)), then
decodes and transforms them (train: RandomResizedCrop `image_size` + horizontal flip, torchvision
transforms v2, parameters drawn from a key of (seed, e, s, position); eval: resize `eval_resize`, center
crop `image_size`) and yields exactly b = floor(floor(T / (W K)) / m) micro-batches of m examples per
epoch. The DataLoader takes the workers' batches round-robin, and `with_epoch(K b)` ends the loader's
epoch there. So:

Ordering guarantees
  * Every rank yields the same number of micro-batches per epoch, K b, with or without resampling: no rank
    waits at an epoch's end for a batch that another rank does not have (the webdataset hangs #188, #303).
  * Not resampled: no example is yielded twice within an epoch (over all ranks); fewer than W K m examples
    per epoch are left out (T - W K m b), a different set each epoch.
  * Resampled: shards are drawn i.i.d., so examples repeat and others are missed within an epoch, as
    with webdataset's `resampled=True`.
  * The stream is a deterministic function of (seed, shards, W, K, m): the same layout replays the same
    micro-batches, bit for bit on CPU (the DataLoader returns worker batches in a fixed round-robin order).
    A different layout gives a different stream: unlike the in-memory reader, global batches are NOT the
    same across layouts (and ghost-BN groups see different examples).
  * Evaluation: the eval split is cut into W K contiguous parts exactly as above (not shuffled), each read by
    one worker of one rank, so the whole split is evaluated exactly once across ranks; ranks may get one
    batch more or less than others (evaluation has no per-batch collective).
Resuming: the position is a function of the step (rank micro-batch p = step A, epoch p // (K b)), so a
checkpoint needs no reader state; on resume the workers fast-forward through the epoch's already used
samples without decoding them. With the same layout the resumed stream is exactly the uninterrupted one;
with another layout it continues at the same epoch and fraction of it, with that layout's stream.
"""

from __future__ import annotations

import gc
import hashlib
import io
import itertools
import random
import sys
import tarfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipelines.config import resolve_workers
from data_pipelines.order import example_keys
from data_pipelines.shards import check_shard_files, split_entry
from data_pipelines.spec import DataSpec
from harness.core.errors import DataError

_SHARD_ORDER_TAG, _BUFFER_TAG, _DRAW_TAG = 0x5EED_0101, 0x5EED_0102, 0x5EED_0103
_MAX_WARNINGS = 3  # per worker: details of the first few bad samples; the count is logged per epoch


@dataclass(frozen=True)
class Piece:
    """Positions [start, stop) of one shard's samples."""

    path: str
    count: int
    sha256: str
    start: int
    stop: int

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.count


def part(shards: list[dict], root: Path, order: list[int], slots: int, slot: int) -> list[Piece]:
    """Slot `slot` of `slots`: its contiguous part of the shards, read in `order`, as one stream."""
    total = sum(s["count"] for s in shards)
    lo, hi = slot * total // slots, (slot + 1) * total // slots
    pieces, offset = [], 0
    for i in order:
        s = shards[i]
        a, b = max(lo, offset), min(hi, offset + s["count"])
        if a < b:
            pieces.append(Piece(str(root / s["name"]), s["count"], s["sha256"], a - offset, b - offset))
        offset += s["count"]
    return pieces


def seek_sample(f, n: int) -> bool:
    """Move `f` (a shard opened for reading, at offset 0) to the first header of its n-th sample by walking the tar
    headers (a 512-byte read and a seek per member), so that a worker whose part starts inside a shard reads none
    of the bytes before it. False (file position undefined) for anything but plain members written by
    webdataset's TarWriter (USTAR): the caller then reads from the start and skips samples instead."""
    seen, current = 0, None
    while True:
        offset = f.tell()
        header = f.read(tarfile.BLOCKSIZE)
        if len(header) < tarfile.BLOCKSIZE:
            return False
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError:  # end of archive (zero block) or not USTAR
            return False
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or "/" in info.name:
            return False
        key = info.name.split(".", 1)[0]  # webdataset's sample key: the name up to its first dot
        if key != current:
            if seen == n:
                f.seek(offset)
                return True
            seen, current = seen + 1, key
        f.seek(offset + tarfile.BLOCKSIZE + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)


class _Hashing(io.RawIOBase):
    """A read-only file wrapper that hashes what passes through (checksums at no extra I/O)."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self.f.readinto(buf)
        self.h.update(memoryview(buf)[:n])
        return n


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0])


def _worker_init(_: int) -> None:
    # A forked worker inherits the training process's objects, among them other loaders' iterators; were its
    # garbage collector to free one, that iterator's __del__ would try to stop workers that are not its
    # children. Freeze what was inherited: the worker collects only its own garbage.
    gc.freeze()


def clean_error(e: DataError) -> DataError:
    """A DataError raised in a loader worker arrives wrapped with the worker's traceback: keep its one line."""
    prefix = f"{DataError.__module__}.DataError: "
    lines = [ln for ln in str(e).splitlines() if ln.startswith(prefix)]
    return DataError(lines[-1][len(prefix):]) if lines else e


class ShardStream(IterableDataset):
    """What one loader worker yields: (uint8 images or JPEG bytes + crops, labels, bad samples skipped)."""

    def __init__(self, root: Path, entry: dict, classes: int, rank: int, world: int, workers: int, batch: int,
                 seed: int, train: bool, augment: bool, resampled: bool, buffer: int, image_size: int,
                 eval_resize: int, gpu_decode: bool, skip_bad: bool, batches: int | None):
        super().__init__()
        self.root, self.shards, self.classes = root, entry["shards"], classes
        self.rank, self.world, self.workers, self.batch = rank, world, max(1, workers), batch
        self.seed, self.train, self.augment, self.resampled, self.buffer = seed, train, augment, resampled, buffer
        self.image_size, self.eval_resize, self.gpu_decode, self.skip_bad = image_size, eval_resize, gpu_decode, skip_bad
        self.batches = batches  # per worker per epoch (train); None: until the part ends (eval)
        # Set by the reader before each epoch's iterator is made (workers get a copy at that moment).
        self.epoch, self.rotation, self.skip = 0, 0, [0] * self.workers

    # ---- which samples
    def _raw(self, slot: int):
        if not self.train:
            yield from self._read(part(self.shards, self.root, list(range(len(self.shards))), self.world * self.workers, slot))
            return
        rng = random.Random(_seed(_BUFFER_TAG, self.seed, self.epoch, slot))
        if self.resampled:
            by_path = {str(self.root / s["name"]): s for s in self.shards}
            draws = wds.ResampledShards(list(by_path), seed=_seed(_DRAW_TAG, self.seed, self.epoch) & 0x7FFFFFFF,
                                        worker_seed=lambda: slot, deterministic=True)
            pieces = (Piece(d["url"], by_path[d["url"]]["count"], by_path[d["url"]]["sha256"], 0, by_path[d["url"]]["count"])
                      for d in draws)
            yield from wds.shuffle(self.buffer, self.buffer, rng=rng)(self._read(pieces))
        else:
            order = np.random.default_rng([_SHARD_ORDER_TAG, self.seed, self.epoch]).permutation(len(self.shards)).tolist()
            pieces = part(self.shards, self.root, order, self.world * self.workers, slot)
            # The part once, shuffled; again (reshuffled) only if bad samples were skipped and it ran short.
            for _ in itertools.count():
                yield from wds.shuffle(self.buffer, self.buffer, rng=rng)(self._read(pieces))

    def _read(self, pieces):
        for piece in pieces:
            yield from self._read_piece(piece)

    def _read_piece(self, piece: Piece):
        position = 0
        try:
            with open(piece.path, "rb") as f:
                if piece.start:
                    if seek_sample(f, piece.start):
                        position = piece.start
                    else:
                        f.seek(0)
                stream = _Hashing(f) if piece.whole else f
                expanded = wds.tariterators.tar_file_expander([{"url": piece.path, "stream": stream}])
                for sample in wds.tariterators.group_by_keys(expanded):
                    if position >= piece.stop:
                        return
                    if position >= piece.start:
                        yield sample
                    position += 1
                if position < piece.stop:
                    raise DataError(f"shard {piece.path} holds {position} samples, the manifest says {piece.count}: it is "
                                    f"truncated or corrupt; re-run the conversion into {self.root}")
                if piece.whole:
                    while stream.read(1 << 20):
                        pass
                    if stream.h.hexdigest() != piece.sha256:
                        raise DataError(f"shard {piece.path} fails its checksum (corrupt); re-run the conversion into "
                                        f"{self.root} to rewrite it")
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            reason = e.args[0] if e.args else ""  # webdataset appends the stream and url to args
            message = (f"shard {piece.path} is truncated or corrupt ({type(e).__name__}: {reason}, after {position} samples); "
                       f"re-run the conversion into {self.root}")
            if not self.skip_bad:
                raise DataError(message) from None
            self._bad(f"{message} (skipping the rest of the shard)", count=0)
        except DataError as e:
            if not self.skip_bad:
                raise
            self._bad(f"{e} (data.skip_bad_samples: kept its samples)", count=0)

    # ---- decoding and transforms
    def _bad(self, message: str, count: int = 1) -> None:
        self._skipped += count
        self._warned += 1
        if self._warned <= _MAX_WARNINGS:
            print(f"harness: warning: {message}", file=sys.stderr)

    def _transform(self, sample: dict, key: int):
        """(image or (jpeg, crop, flip), label), or None for a bad sample (skip_bad)."""
        from PIL.Image import DecompressionBombError  # Image.open of a header claiming > 2 x MAX_IMAGE_PIXELS
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms.v2 import functional as F

        where = f"sample {sample.get('__key__')} of shard {sample.get('__url__')}"
        try:
            label = int(sample["cls"])
            data = sample["jpg"]
        except (KeyError, ValueError) as e:
            return self._reject(f"{where} lacks a .jpg or a valid .cls ({e}); re-run the conversion into {self.root}")
        if not 0 <= label < self.classes:
            return self._reject(f"{where}: label {label} is outside 0..{self.classes - 1}; fix the source labels and re-convert")
        try:
            if self.gpu_decode:  # decoded later, on the GPU; crop from the header's size
                from PIL import Image

                image = Image.open(io.BytesIO(data))
                size = (image.height, image.width)
                encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            else:
                with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
                    warnings.simplefilter("ignore", DeprecationWarning)
                    image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
                size = tuple(image.shape[-2:])
        except (RuntimeError, OSError, ValueError, SyntaxError, DecompressionBombError) as e:
            return self._reject(f"{where} is not a readable JPEG ({type(e).__name__}: {e}); re-run the conversion into {self.root}")
        if self.train and self.augment:
            crop = self._crop(size, key)
            flip = bool((key >> 32) & 1)
        else:
            crop, flip = None, False
        if self.gpu_decode:
            return (encoded, crop if crop is not None else (-1, -1, -1, -1), flip), label
        return transform(image, crop, flip, self.image_size, self.eval_resize, F), label

    def _crop(self, size: tuple[int, int], key: int) -> tuple[int, int, int, int]:
        """RandomResizedCrop's (top, left, height, width) for an image of `size`, drawn from the example's key."""
        rrc = _rrc(self.image_size)
        probe = torch.empty((0, *size), dtype=torch.uint8)  # make_params reads only the size
        # make_params draws from torch's global CPU generator: seed it with the key (the generator's own
        # manual_seed: torch.manual_seed also seeds every accelerator, at ~5 ms a call), and in the training
        # process restore it afterwards (its RNG also serves dropout, ...).
        generator = torch.random.default_generator
        saved = generator.get_state() if get_worker_info() is None else None
        generator.manual_seed(key & 0x7FFF_FFFF_FFFF_FFFF)
        p = rrc.make_params([probe])
        if saved is not None:
            generator.set_state(saved)
        return p["top"], p["left"], p["height"], p["width"]

    def _reject(self, message: str):
        if not self.skip_bad:
            raise DataError(message)
        self._bad(message)
        return None

    def _collate(self, items: list) -> tuple:
        """(images, labels, keys: the examples' positions in their split, bad samples skipped since the last batch)."""
        labels = torch.tensor([y for _, y, _ in items], dtype=torch.int64)
        keys = torch.tensor([k for _, _, k in items], dtype=torch.int64)
        skipped, self._skipped = self._skipped, 0
        if self.gpu_decode:
            # The batch's JPEG bytes as ONE tensor plus their lengths: a loader worker hands each tensor to the
            # training process through shared memory with a file descriptor of its own, so one tensor per JPEG
            # would hold about a thousand descriptors per rank open at the defaults.
            encoded = [x[0] for x, _, _ in items]
            lengths = torch.tensor([len(e) for e in encoded], dtype=torch.int64)
            crops = torch.tensor([x[1] for x, _, _ in items], dtype=torch.int64)
            flips = torch.tensor([x[2] for x, _, _ in items], dtype=torch.bool)
            return (torch.cat(encoded), lengths, crops, flips), labels, keys, skipped
        return torch.stack([x for x, _, _ in items]), labels, keys, skipped

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        logical = (worker + self.rotation) % self.workers
        slot = self.rank * self.workers + logical
        self._skipped, self._warned = 0, 0
        raw = self._raw(slot)
        skip = self.skip[logical] * self.batch if self.train else 0
        for _ in range(skip):  # fast-forward on resume: read, never decode
            next(raw, None)
        position, target = skip, (self.batches - self.skip[logical]) if self.train else None
        items, made, misses = [], 0, 0
        keyed = self.train and self.augment
        for sample in raw:
            # The augmentation key of this draw: (seed, epoch, slot, position in the slot's shuffled stream).
            key = int(example_keys(self.seed, np.array([self.epoch]), np.array([(slot << 40) | position]))[0]) if keyed else 0
            position += 1
            item = self._transform(sample, key)
            if item is None:
                misses += 1
                if misses > 100 * self.batch and not items and made == 0:
                    raise DataError(f"no readable sample in the first {misses} of this worker's part of {self.root}; "
                                    "re-run the conversion")
                continue
            items.append((*item, int(sample["__key__"])))
            if len(items) == self.batch:
                yield self._collate(items)
                items, made = [], made + 1
                if target is not None and made >= target:
                    return
        if items and not self.train:
            yield self._collate(items)


_RRC = {}


def _rrc(size: int):
    if size not in _RRC:
        from torchvision.transforms import v2

        _RRC[size] = v2.RandomResizedCrop(size, antialias=True)  # scale (0.08, 1), ratio (3/4, 4/3): Goyal et al.
    return _RRC[size]


def transform(image: torch.Tensor, crop, flip: bool, image_size: int, eval_resize: int, F) -> torch.Tensor:
    """uint8 (3, h, w) -> uint8 (3, S, S): crop given: resized crop (+ flip); else resize + center crop."""
    if crop is not None and crop[0] >= 0:
        top, left, height, width = crop
        image = F.resized_crop(image, top, left, height, width, [image_size, image_size], antialias=True)
        return F.horizontal_flip(image) if flip else image
    image = F.resize(image, eval_resize, antialias=True)
    return F.center_crop(image, [image_size, image_size])


class StreamingImages:
    """The trainer's data source for streamed JPEG shards (see the module docstring for its guarantees)."""

    def __init__(self, path, manifest, plan, seed, rank, device, dtype, augment, eval_batch_size, options):
        # Imported here once (seconds: torchvision pulls in torch._dynamo), inherited by the forked workers.
        import torchvision.io  # noqa: F401
        import torchvision.transforms.v2  # noqa: F401

        root = Path(path)
        self.plan, self.rank, self.device, self.dtype = plan, rank, device, dtype
        self.options = options
        train = split_entry(manifest, root, "train")
        evaluation = split_entry(manifest, root, manifest.get("eval_split", "val"))
        check_shard_files(root, train)
        check_shard_files(root, evaluation)
        classes = len(manifest["classes"])
        options = replace(options, workers=resolve_workers(options.workers))
        self.options = options
        self.workers = max(1, options.workers)
        slots = plan.world_size * self.workers
        m = plan.micro_batch_size
        per_slot = train["size"] // slots
        self.per_worker = per_slot // m
        if self.per_worker == 0:
            raise DataError(
                f"the train split of {root} ({train['size']} examples) gives each of the {slots} loader workers "
                f"({plan.world_size} ranks x {self.workers}) {per_slot} examples, less than one micro-batch of {m}; "
                "lower data.workers or the micro-batch")
        self.per_epoch = self.workers * self.per_worker  # micro-batches per rank per stream epoch
        common = dict(root=root, classes=classes, rank=rank, world=plan.world_size, workers=options.workers, seed=seed,
                      augment=augment, resampled=options.resampled, buffer=options.shuffle_buffer,
                      image_size=options.image_size, eval_resize=options.eval_resize, gpu_decode=options.gpu_decode,
                      skip_bad=options.skip_bad_samples)
        self.train_stream = ShardStream(entry=train, batch=m, train=True, batches=self.per_worker, **common)
        self.eval_stream = ShardStream(entry=evaluation, batch=eval_batch_size, train=False, batches=None, **common)
        cuda = torch.device(device).type == "cuda"
        # A generator of its own: the DataLoader draws its workers' base seed from it at every epoch, and
        # would otherwise advance the training process's global RNG (we seed everything from keys anyway).
        loader = dict(batch_size=None, num_workers=options.workers, pin_memory=cuda, persistent_workers=False,
                      prefetch_factor=2 if options.workers else None, generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=_worker_init if options.workers else None)
        self.train_loader = wds.WebLoader(self.train_stream, **loader)
        self.eval_loader = DataLoader(self.eval_stream, **loader)
        std = torch.tensor(manifest["std"], dtype=torch.float64)
        mean = torch.tensor(manifest["mean"], dtype=torch.float64)
        self.scale = (1.0 / (255.0 * std)).to(device, dtype).view(1, -1, 1, 1)
        self.shift = (-mean / std).to(device, dtype).view(1, -1, 1, 1)
        size = options.image_size
        self.spec = DataSpec(kind=manifest["kind"], task="classification", num_train=train["size"],
                             num_test=evaluation["size"], num_classes=classes, in_shape=(3, size, size))
        self._iterator, self._position, self._epoch, self._skipped = None, -1, 0, 0
        used = slots * self.per_worker * m
        if rank == 0:
            from tqdm import tqdm

            mode = "shards drawn with replacement" if options.resampled else f"{train['size'] - used} examples left out per epoch"
            tqdm.write(f"harness: stream: {self.per_epoch} micro-batches of {m} per rank per epoch ({plan.world_size} ranks x "
                       f"{self.workers} workers x {self.per_worker}; {used} of {train['size']} examples; {mode})")

    # ---- training
    def _start(self, epoch: int, offset: int) -> None:
        """Begin stream epoch `epoch` at its micro-batch `offset` (0 unless resuming)."""
        self._iterator = None  # lets the previous epoch's workers exit before new ones start
        k = self.workers
        s = self.train_stream
        s.epoch, s.rotation = epoch, offset % k
        # Micro-batch j of the epoch comes from worker j mod K (round-robin): worker w has made len(range(w, offset, K)).
        s.skip = [len(range(w, offset, k)) for w in range(k)]
        self._iterator = iter(self.train_loader.with_epoch(self.per_epoch - offset))
        self._epoch, self._position = epoch, epoch * self.per_epoch + offset

    def _next(self):
        while True:
            try:
                batch = next(self._iterator)
                self._position += 1
                self._skipped += batch[3]
                return batch
            except StopIteration:
                if self._position != (self._epoch + 1) * self.per_epoch:
                    raise DataError(f"the stream ended after {self._position} micro-batches in epoch {self._epoch}, "
                                    f"short of {(self._epoch + 1) * self.per_epoch}") from None
                self._log_skipped(f"training epoch {self._epoch}")
                self._start(self._epoch + 1, 0)
            except DataError as e:
                raise clean_error(e) from None

    def _log_skipped(self, what: str) -> None:
        if self._skipped:
            print(f"harness: warning: rank {self.rank} left out {self._skipped} bad samples in {what} "
                  "(data.skip_bad_samples)", file=sys.stderr)
        self._skipped = 0

    def train_micro_batches(self, step: int, keys: bool = False):
        """This rank's A micro-batches of step `step`: micro-batches step A ... step A + A - 1 of its stream.
        keys: also yield each example's key (its position in the train split), for tests and debugging."""
        a = self.plan.accumulation_steps
        want = step * a
        if want != self._position or self._iterator is None:
            self._start(*divmod(want, self.per_epoch))
        for _ in range(a):
            yield self._finish(self._next(), keys)

    # ---- evaluation
    def eval_batches(self, split: str = "test", keys: bool = False):
        """This rank's part of the eval split; the ranks' parts cover it exactly once."""
        if split != "test":
            raise DataError("eval.train_loss: the loss over the whole streamed training set (1.28M ImageNet images) is "
                            "not available; set eval.train_loss: false (the final-window train_loss is still recorded)")
        skipped = 0
        try:
            for batch in self.eval_loader:
                skipped += batch[3]
                yield self._finish(batch, keys)
        except DataError as e:
            raise clean_error(e) from None
        if skipped:
            print(f"harness: warning: rank {self.rank} left out {skipped} bad samples in evaluation "
                  "(data.skip_bad_samples)", file=sys.stderr)

    # ---- to the device, normalized
    def _finish(self, batch, keys: bool = False):
        images, labels, example_keys_, _ = batch
        if self.options.gpu_decode:
            images = self._gpu_decode(*images)
        x = images.to(self.device, non_blocking=True)
        out = torch.addcmul(self.shift, x.to(self.dtype), self.scale), labels.to(self.device, non_blocking=True)
        return (*out, example_keys_) if keys else out

    def _gpu_decode(self, data, lengths, crops, flips) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms.v2 import functional as F

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                encoded = list(data.split(lengths.tolist()))  # views of the one tensor (lengths: a CPU tensor)
                images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError as e:
                raise DataError(f"GPU JPEG decoding failed ({e}); set data.gpu_decode=false to decode in the workers "
                                "(and name the bad sample)") from None
        size, resize = self.options.image_size, self.options.eval_resize
        return torch.stack([transform(img, tuple(c.tolist()), bool(f), size, resize, F)
                            for img, c, f in zip(images, crops, flips)])
