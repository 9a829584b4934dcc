"""Harness overhead: `harness train` step time / a bare PyTorch loop's, same model, batch, optimizer, data.

Both sides run in this process, alternating, so machine noise hits both. The harness side is the MARGINAL
step time of `harness.train.trainer.train` with its defaults (keyed per-example augmentation, ghost-BN running-stat
sync, metrics, TensorBoard, tqdm): wall(long run) - wall(short run), divided by the extra steps, which cancels
start-up, data loading and the final evaluation. The bare loop is what a user would write by hand: a preloaded
normalized float tensor, a random permutation, one random crop offset and flip per batch, loss.mean(),
backward, torch.optim.SGD step; timed after warm-up.

The cost of the online gradient noise scale (`log.noise_scale`, harness/train/noise_scale.py) is measured the same
way, as ratios of harness step times in the same run: (a) on against off at the default layout, where at world
size 1 turning it on splits each batch into two micro-steps of B/2 (the measured cost is mostly that split);
(b) on against off at two micro-steps for both (`batch.micro_batch_size` = B/2), the estimator's own cost (two
gradient norms and a few scalars per step, on the device); (c) those operations alone on the model's real
gradients, timed over 200 repeats, as a fraction of the step of (b): a precise number where (a) and (b) drown in
the noise of a shared machine.

    python benchmarks/overhead.py                      # WRN-16-4 (the paper's model) and WRN-10-1, B = 64
    python benchmarks/overhead.py --depth 10 --width 1 --batch 128 --threads 1
    python benchmarks/overhead.py --depth 10 --width 1 --batch 128 --noise-only  # only the noise-scale ratios

(At world size 1 the split needs B/2 to be whole ghost-BN groups: B = 128 for the WRN's groups of 64; at B = 64
the trainer says so and measures nothing.)
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import models  # noqa: E402
from data_pipelines.memory import load_split  # noqa: E402
from data_pipelines.shards import read_manifest  # noqa: E402
from data_pipelines.spec import DataSpec  # noqa: E402
from data_pipelines.synth import synth  # noqa: E402
from harness.recipe.optim import build_optimizer, torch_lr  # noqa: E402
from harness.train.config import load_config  # noqa: E402
from harness.train.trainer import train  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def harness_step_time(shards: Path, work: Path, depth: int, width: int, batch: int, short: int, long: int,
                      device: str = "cpu", extra: tuple[str, ...] = ()) -> float:
    walls = {}
    for steps in (short, long):
        cfg = load_config(None, ["data.name=cifar10", f"data.path={shards}", "model.name=wrn", f"model.depth={depth}",
                                 f"model.width={width}", f"batch.global_batch_size={batch}", f"budget.steps={steps}",
                                 f"device={device}", "optim.effective_lr=0.1", *extra])
        run = Path(tempfile.mkdtemp(dir=work))
        _sync(device)
        t0 = time.perf_counter()
        train(cfg, run)
        _sync(device)
        walls[steps] = time.perf_counter() - t0
    return (walls[long] - walls[short]) / (long - short)


def bare_step_time(shards: Path, depth: int, width: int, batch: int, steps: int, warmup: int = 3,
                   device: str = "cpu") -> float:
    manifest = read_manifest(shards)
    images, labels = load_split(shards, manifest, "train")
    mean = torch.tensor(manifest["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(manifest["std"]).view(1, 3, 1, 1)
    data = ((images.float() / 255 - mean) / std).to(device)
    labels = labels.to(device)
    spec = DataSpec("cifar10", "classification", len(labels), 0, 10, (3, 32, 32))
    cfg = load_config(None, [f"data.path={shards}", "data.name=cifar10", "model.name=wrn", f"model.depth={depth}",
                             f"model.width={width}", "budget.steps=1"]).model
    torch.manual_seed(0)
    model = models.build_model(cfg, spec).to(device)
    opt = build_optimizer(model.parameters(), "momentum", 0.9, 5e-4)
    for group in opt.param_groups:
        group["lr"] = torch_lr(0.1, 0.9)
    perm = torch.randperm(len(labels), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        idx = perm[(i * batch) % (len(labels) - batch):][:batch]
        x, y = data[idx], labels[idx]
        dy, dx = torch.randint(0, 9, (2,)).tolist()
        x = F.pad(x, (4, 4, 4, 4))[:, :, dy:dy + 32, dx:dx + 32]
        if torch.rand(()) < 0.5:
            x = x.flip(3)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def estimator_time(shards: Path, depth: int, width: int, batch: int, repeats: int = 200) -> float:
    """Seconds per step of what log.noise_scale adds to a step that already has two micro-steps: the squared norm
    of the first micro-step's gradients, the norm of the final gradient (otherwise only computed at log steps),
    and the EMA update; on this model's real gradients, timed over many repeats (robust to machine noise)."""
    from harness.train.noise_scale import NoiseScale, squared_norm

    cfg = load_config(None, [f"data.path={shards}", "data.name=cifar10", "model.name=wrn", f"model.depth={depth}",
                             f"model.width={width}", "budget.steps=1"]).model
    torch.manual_seed(0)
    model = models.build_model(cfg, DataSpec("cifar10", "classification", 1, 0, 10, (3, 32, 32)))
    F.cross_entropy(model(torch.randn(batch, 3, 32, 32)), torch.randint(0, 10, (batch,))).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    noise = NoiseScale(batch // 2, batch, 0.99, torch.device("cpu"))
    t0 = time.perf_counter()
    for _ in range(repeats):
        small = squared_norm(grads) * 4.0
        big = torch.nn.utils.get_total_norm(grads).double().square()
        noise.observe(small, big)
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, nargs="+", default=[16, 10])
    p.add_argument("--width", type=int, nargs="+", default=[4, 1])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=0, help="extra steps measured (default: 20 for WRN-16-4, 100 else)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    p.add_argument("--noise-only", action="store_true", help="only the log.noise_scale ratios (no bare loop)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="overhead-"))
    atexit.register(shutil.rmtree, work, True)  # the shards and run dirs (about 25 MB), also when a run fails
    shards = work / "cifar10"
    synth("cifar10", shards, train=4096, test=256)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.repeats} alternating repeats (median)")
    for depth, width in zip(args.depth, args.width):
        steps = args.steps or (20 if depth * width >= 64 else 100)
        # Warm-up, discarded: the first train() in a process imports torch's compiler stack (seconds), which would
        # otherwise land in the first short run and make the first variant's marginal step time too small.
        harness_step_time(shards, work, depth, width, args.batch, 1, 2)
        half = f"batch.micro_batch_size={args.batch // 2}"
        variants = {"harness": (), "noise": ("log.noise_scale=true",), "split": (half,),
                    "split+noise": (half, "log.noise_scale=true")}
        noise = args.batch % 128 == 0  # B / 2 in whole ghost-BN groups of 64 (the WRN's)
        if not noise:
            variants = {"harness": ()}
            print(f"WRN-{depth}-{width}: log.noise_scale not measured: at W = 1 it splits B = {args.batch} in two, "
                  "which needs B / 2 in whole ghost-BN groups of 64; use --batch 128")
        times: dict[str, list[float]] = {k: [] for k in ("bare", *variants)}
        for _ in range(args.repeats):
            if not args.noise_only:
                times["bare"].append(bare_step_time(shards, depth, width, args.batch, steps))
            for name, extra in variants.items():
                times[name].append(harness_step_time(shards, work, depth, width, args.batch, 5, 5 + steps, extra=extra))
        t = {k: statistics.median(v) for k, v in times.items() if v}
        if "bare" in t:
            print(f"WRN-{depth}-{width}: harness {t['harness'] * 1e3:.1f} ms/step, bare loop {t['bare'] * 1e3:.1f} ms/step, "
                  f"ratio {t['harness'] / t['bare']:.3f} (target <= 1.03)")
        if noise:
            est = estimator_time(shards, depth, width, args.batch)
            print(f"WRN-{depth}-{width}: the estimator's own operations: {est * 1e3:.3f} ms/step = "
                  f"{est / t['split']:.5f} of the harness step with 2 micro-steps ({t['split'] * 1e3:.1f} ms)")
            print(f"WRN-{depth}-{width}: log.noise_scale on / off: {t['noise'] / t['harness']:.3f} at the default layout "
                  f"(W = 1: B = {args.batch} split into 2 micro-steps of {args.batch // 2}); "
                  f"{t['split+noise'] / t['split']:.3f} with 2 micro-steps either way (the estimator alone; "
                  f"{t['split'] * 1e3:.1f} ms/step off)")


if __name__ == "__main__":
    main()
