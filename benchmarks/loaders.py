"""Data-loader throughput, each against a baseline measured in the same run (speed is never asserted in tests).

(a) In-memory CIFAR reader + augmentation (pad 4, crop, flip, normalize) on ONE core (torch.set_num_threads(1)):
    images/s of `train_micro_batches`, target >= 50,000; baseline: the same reader with the reference per-pixel
    gather (`augment.crop_flip`) instead of the row gather of `augment.PaddedImages`.
(b) Streaming JPEG reader (decode + RandomResizedCrop 224 + flip, uint8 batches -> normalized float): images/s per
    loader worker; baseline: torchvision ImageFolder + DataLoader with the same transforms (PIL decode, v2
    RandomResizedCrop 224 + RandomHorizontalFlip + PILToTensor) on the same JPEG files; target ratio >= 1.0.

Timing excludes one-time set-up (loading, worker start-up: the clock starts at the first batch). The machine may
be shared: rounds alternate between contenders and the median is reported, as wall-clock and per CPU-second.

    PYTHONPATH=. python benchmarks/loaders.py [--images 480] [--workers 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_pipelines import ReaderOptions, build_data  # noqa: E402
from harness.recipe.batch_plan import make_batch_plan  # noqa: E402


def _proc_cpu(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class CpuClock:
    """CPU seconds of this process and its loader workers over an interval (running workers read from /proc,
    workers that ended and were reaped from os.times; approximate when a worker ends unreaped)."""

    def __init__(self):
        import multiprocessing

        self.children = lambda: [c.pid for c in multiprocessing.active_children()]
        t = os.times()
        self.own, self.reaped = t.user + t.system, t.children_user + t.children_system
        self.alive = {p: c for p in self.children() if (c := _proc_cpu(p)) is not None}

    def elapsed(self) -> float:
        t = os.times()
        alive = {p: c for p in self.children() if (c := _proc_cpu(p)) is not None}
        workers = (t.children_user + t.children_system - self.reaped
                   + sum(c - self.alive.get(p, 0.0) for p, c in alive.items())
                   - sum(c for p, c in self.alive.items() if p not in alive))
        return t.user + t.system - self.own + workers


# --------------------------------------------------------------------------------------------- (a) in memory


def bench_memory(rounds: int, steps: int, batch: int) -> None:
    from data_pipelines.augment import crop_flip
    from data_pipelines.synth import synth

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        print("(a) writing 50,000 synthetic CIFAR-10 training images ...", file=sys.stderr)
        synth("cifar10", tmp, train=50000, test=100, per_shard=10000)
        plan = make_batch_plan(batch, 1, batch, ghost_batch_size=64)
        opts = ReaderOptions.of()
        src = build_data("cifar10", tmp, True, 100, plan, 0, 0, torch.device("cpu"), torch.float32, opts)

    class Reference:  # the same reader, cropping with the reference per-pixel gather
        def __init__(self, store):
            self.store = store
            self.images = store.images.contiguous()

        def crop(self, index, dy, dx, fl):
            return crop_flip(self.images[index], dy, dx, fl, self.store.pad)

    fast = src.train
    results = {"row gather (PaddedImages)": [], "reference per-pixel gather": []}
    for r in range(rounds):
        for name in results:
            src.train = fast if name.startswith("row") else Reference(fast)
            list(src.train_micro_batches(0))  # warm-up
            wall, cpu = time.perf_counter(), time.process_time()
            for step in range(r * steps, (r + 1) * steps):
                for x, y, *_ in src.train_micro_batches(step):
                    pass
            n = steps * batch
            results[name].append((n / (time.perf_counter() - wall), n / (time.process_time() - cpu)))
    src.train = fast
    print(f"(a) in-memory CIFAR-10 loader + augmentation, 1 thread, B = {batch}, {steps} steps x {rounds} rounds (median):")
    for name, values in results.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        print(f"    {name:28s} {wall:9,.0f} img/s wall   {cpu:9,.0f} img/s per CPU-second")
    ours = statistics.median(v[1] for v in results["row gather (PaddedImages)"])
    ref = statistics.median(v[1] for v in results["reference per-pixel gather"])
    print(f"    target >= 50,000 img/s: {'met' if ours >= 50000 else 'NOT met'} ({ours:,.0f} per CPU-second); "
          f"ratio to the reference gather {ours / ref:.2f}")


# --------------------------------------------------------------------------------------------- (b) streaming


def natural_jpegs(n: int, seed: int = 0) -> list[tuple[bytes, int]]:
    """ImageNet-like JPEGs: crops of scikit-learn's two sample photos rescaled to ~460 x 365 (ImageNet's typical
    size), with pixel noise for texture, at quality 95: ~100 kB each (ImageNet's train images average ~110 kB)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # 427 x 640 RGB
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % 2]
        h, w = int(rng.integers(240, 427)), int(rng.integers(320, 640))
        y, x = int(rng.integers(0, 428 - h)), int(rng.integers(0, 641 - w))
        size = (int(rng.integers(400, 520)), int(rng.integers(330, 400)))
        image = np.asarray(Image.fromarray(photo[y:y + h, x:x + w]).resize(size, Image.BILINEAR)).astype(np.int16)
        image = image + rng.integers(-16, 17, size=image.shape, dtype=np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
        out.append((buf.getvalue(), i % 10))
    return out


def time_batches(batches, count: int) -> tuple[float, float]:
    """(img/s wall, img/s per CPU-second incl. workers) over `count` images after the first batch."""
    it = iter(batches)
    next(it)  # set-up (worker start, shuffle buffer fill) is not timed
    seen, wall, cpu = 0, time.perf_counter(), CpuClock()
    for x, _ in it:
        seen += len(x)
        if seen >= count:
            break
    return seen / (time.perf_counter() - wall), seen / max(cpu.elapsed(), 1e-9)


def bench_stream(images: int, workers: int, rounds: int, batch: int) -> None:
    import torchvision
    from torch.utils.data import DataLoader
    from torchvision.transforms import v2

    from data_pipelines.imagenet import Items, write_jpeg_dataset

    warnings.simplefilter("ignore", DeprecationWarning)
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp()
    print(f"(b) writing {images} ImageNet-like JPEGs as a folder tree and as shards ...", file=sys.stderr)
    jpegs = natural_jpegs(images)
    for i, (data, label) in enumerate(jpegs):
        folder = Path(tmp, "tree", f"n{label:08d}")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.JPEG").write_bytes(data)
    labels = np.array([label for _, label in jpegs])
    items = Items([str(i) for i in range(images)], labels, lambda i: jpegs[i][0])
    shards = Path(tmp, "shards")
    write_jpeg_dataset("imagenet", shards, {"train": items, "val": items}, [f"n{c:08d}" for c in range(10)], "bench",
                       shard_size=64, threads=2)
    mean_kb = np.mean([len(d) for d, _ in jpegs]) / 1000

    opts = ReaderOptions(workers=workers, shuffle_buffer=256, resampled=True, image_size=224, eval_resize=256,
                         gpu_decode=False, skip_bad_samples=False)
    plan = make_batch_plan(batch, 1, batch)
    src = build_data("imagenet", shards, True, batch, plan, 0, 0, torch.device("cpu"), torch.float32, opts)
    scale, shift = src.scale, src.shift

    baseline_set = torchvision.datasets.ImageFolder(
        str(Path(tmp, "tree")),
        transform=v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()]))

    def baseline():
        loader = DataLoader(baseline_set, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                            persistent_workers=False, prefetch_factor=4)
        for _ in range(1000):
            for x, y in loader:
                yield torch.addcmul(shift, x.float(), scale), y  # the same normalization as the reader

    def streaming():
        step = 0
        while True:
            yield from src.train_micro_batches(step)
            step += 1

    count = images  # one pass over the data per measurement, after the first batch
    results = {"streaming shards (ours)": [], "ImageFolder + DataLoader": []}
    for _ in range(rounds):
        for name in results:
            results[name].append(time_batches(streaming() if name.startswith("streaming") else baseline(), count))
    print(f"(b) JPEG loading, RandomResizedCrop 224 + flip, {images} images of ~{mean_kb:.0f} kB, {workers} loader "
          f"worker(s), batch {batch}, {rounds} rounds (median):")
    med = {}
    for name, values in results.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        med[name] = (wall, cpu)
        print(f"    {name:26s} {wall / workers:7,.0f} img/s per worker (wall)   {cpu:7,.0f} img/s per CPU-second")
    ours, base = med["streaming shards (ours)"], med["ImageFolder + DataLoader"]
    print(f"    ratio streaming / ImageFolder: {ours[0] / base[0]:.2f} wall, {ours[1] / base[1]:.2f} per CPU-second "
          f"(target >= 1.0: {'met' if ours[0] / base[0] >= 1.0 else 'NOT met'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="(a) steps per round")
    parser.add_argument("--batch", type=int, default=512, help="(a) global batch")
    parser.add_argument("--images", type=int, default=480, help="(b) JPEGs per measurement")
    parser.add_argument("--workers", type=int, default=1, help="(b) loader workers for both contenders")
    parser.add_argument("--stream-batch", type=int, default=32, help="(b) micro-batch")
    parser.add_argument("--only", choices=["memory", "stream"])
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  {os.cpu_count()} CPUs  torch {torch.__version__}")
    if args.only != "stream":
        bench_memory(args.rounds, args.steps, args.batch)
    if args.only != "memory":
        bench_stream(args.images, args.workers, args.rounds, args.stream_batch)


if __name__ == "__main__":
    main()
