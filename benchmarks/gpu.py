"""GPU throughput of the harness, each figure beside a baseline measured in the same run, into one JSON file.

    python benchmarks/gpu.py --out gpu.json            # on a GPU: at most about 8 minutes
    python benchmarks/gpu.py --tiny --out gpu.json     # tiny models on whatever device there is (CI, on the CPU)

Measured (every timing starts after warm-up, ends with a device synchronization, and is a marginal step time:
the wall time of a long run minus a short one, over the extra steps, so start-up, data loading, cuDNN autotuning
and compilation cancel):
- wrn16_4: `harness train` img/s at B = 1024 (bf16, channels_last, data resident on the GPU), and the fraction of
  the H200's bf16 dense peak (989 TFLOP/s) at 2.36 GFLOP per image (forward + backward); at B = 128: one run vs
  a pack of 8 (`train_pack`, harness/train/packed.py), and their ratio;
- resnet50: the engine's img/s on synthetic 224 px images already on the GPU (bf16, channels_last, B = 256),
  with and without torch.compile;
- jpeg: the streaming ImageNet reader's img/s from synthetic JPEG shards, CPU decode with N workers and nvjpeg
  (data.gpu_decode), as a fraction of the in-GPU ResNet-50 rate;
- overhead: `harness train` step time over a bare PyTorch loop's on the same model and data (benchmarks/overhead.py);
- ghost_bn: GhostBatchNorm2d over nn.BatchNorm2d, forward + backward (benchmarks/ghost_bn.py);
- peak memory (torch.cuda.max_memory_allocated) of each.
The synthetic JPEGs are small (40-96 px), so decode rates there are upper bounds for ImageNet's ~110 kB images.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s
GFLOP = {"wrn16_4": 2.36e9, "resnet50": 24.5e9}  # training cost per image (forward and backward)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def marginal(run, short: int, long: int, device: torch.device) -> float:
    """Seconds per step of `run(steps)` beyond its start-up: (wall(long) - wall(short)) / (long - short)."""
    walls = {}
    for steps in (short, long):
        sync(device)
        t0 = time.perf_counter()
        run(steps)
        sync(device)
        walls[steps] = time.perf_counter() - t0
    return max(walls[long] - walls[short], 1e-9) / (long - short)


def wrn(args, device: torch.device, work: Path) -> dict:
    """harness train (one run) and train_pack (8 runs) on WRN-16-4 (tiny: WRN-10-1), CIFAR-shaped data in memory."""
    from data_pipelines.synth import synth
    from harness.train.config import load_config
    from harness.train.packed import train_pack
    from harness.train.trainer import train

    shards = work / "cifar10"
    synth("cifar10", shards, train=512 if args.tiny else 16384, test=64, seed=0, per_shard=4096)
    depth, width = (10, 1) if args.tiny else (16, 4)
    precision = "bf16" if device.type == "cuda" else "fp32"

    def cfg(b, steps, seed=0, lr=1.0, precision=precision):
        return load_config(None, ["data.name=cifar10", f"data.path={shards}", "model.name=wrn", f"model.depth={depth}",
                                  f"model.width={width}", f"batch.global_batch_size={b}", "batch.max_micro_batch_size=1024",
                                  f"budget.steps={steps}", f"precision={precision}", f"device={device.type}",
                                  f"seed={seed}", f"optim.effective_lr={lr}", "log.progress=false",
                                  "log.tensorboard=false", "log.every_steps=50", "checkpoint.every_minutes=null"])

    def one(b, precision=precision):
        return lambda steps: train(cfg(b, steps, precision=precision), Path(tempfile.mkdtemp(dir=work)))

    def pack(b, runs=8):  # a pack packs fp32/fp64 runs; bf16 autocast is for one run
        return lambda steps: train_pack([cfg(b, steps, seed=r % 2, lr=0.5 * (r + 1), precision="fp32") for r in range(runs)],
                                        [Path(tempfile.mkdtemp(dir=work)) for _ in range(runs)])

    short, long = (1, 3) if args.tiny else (20, 120)
    out = {"model": f"wrn-{depth}-{width}", "precision": precision}
    big = 128 if args.tiny else 1024
    reset_peak(device)
    t = marginal(one(big), short, long, device)
    out[f"b{big}_images_per_second"] = big / t
    out[f"b{big}_peak_memory_gib"] = peak_memory(device)
    if not args.tiny:
        out["b1024_fraction_of_bf16_peak"] = big / t * GFLOP["wrn16_4"] / H200_BF16_PEAK
    small = 64 if args.tiny else 128
    reset_peak(device)
    t1 = marginal(one(small, "fp32"), short, long, device)
    reset_peak(device)
    t8 = marginal(pack(small), short, long, device)
    out.update({f"b{small}_one_run_images_per_second": small / t1, f"b{small}_pack8_images_per_second": 8 * small / t8,
                f"b{small}_pack8_speedup": (8 * small / t8) / (small / t1), f"b{small}_pack8_peak_memory_gib": peak_memory(device)})
    return out


def engine_rate(model_cfg: dict, spec, b: int, device: torch.device, compile_: bool, steps: int, warmup: int) -> tuple[float, float | None]:
    """img/s of the harness's engine on a synthetic batch already on the device (no data loading)."""
    import models
    from harness.core import configlib
    from harness.recipe.batch_plan import make_batch_plan
    from harness.recipe.optim import build_optimizer
    from harness.train.engine import DDPEngine
    from harness.train.objectives import Classification
    from models.registry import config_class

    cfg = configlib.load(config_class(model_cfg["name"]), model_cfg)
    torch.manual_seed(0)
    model = models.build_model(cfg, spec).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    plan = make_batch_plan(b, 1, b, None, cfg.ghost_group_size())
    engine = DDPEngine(model, build_optimizer(model.parameters(), "momentum", 0.9, 1e-4, fused=True), plan, device,
                       "bf16" if device.type == "cuda" else "fp32", None)
    if compile_:
        engine.compile()
    x = torch.randn(b, *spec.in_shape, device=device)
    y = torch.randint(0, spec.num_classes, (b,), device=device)
    objective = Classification()
    reset_peak(device)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        engine.micro_step(objective, (x, y), b, 0)
        engine.step(0.1, False)
    sync(device)
    return steps * b / (time.perf_counter() - t0), peak_memory(device)


def resnet(args, device: torch.device) -> dict:
    from data_pipelines.spec import DataSpec

    size = 32 if args.tiny else 224
    spec = DataSpec("imagenet", "classification", 1, 1, 1000, (3, size, size))
    model = {"name": "resnet", "depth": 18, "width": 8} if args.tiny else {"name": "resnet", "depth": 50}
    b, steps, warmup = (64, 2, 1) if args.tiny else (256, 40, 15)
    out = {"model": "resnet-18-w8" if args.tiny else "resnet-50", "image_size": size, "batch": b}
    for compile_ in ((False,) if args.tiny and device.type == "cpu" else (False, True)):
        rate, mem = engine_rate(model, spec, b, device, compile_, steps, warmup)
        key = "compiled" if compile_ else "eager"
        out[f"{key}_images_per_second"], out[f"{key}_peak_memory_gib"] = rate, mem
    return out


def jpeg(args, device: torch.device, work: Path, in_gpu_rate: float) -> dict:
    """Images/s of the streaming reader (decode, RandomResizedCrop, flip, to the device, normalized)."""
    from data_pipelines import ReaderOptions, build_data
    from data_pipelines.synth import synth
    from harness.recipe.batch_plan import make_batch_plan

    shards = work / "imagenet"
    synth("imagenet", shards, train=512 if args.tiny else 8192, test=64, seed=0)
    b = 32 if args.tiny else 256
    plan = make_batch_plan(b, 1, b)
    out = {}
    for label, workers, gpu in (("cpu_decode", args.workers, False), ("nvjpeg", args.workers, True)):
        if gpu and device.type != "cuda":
            continue
        opts = ReaderOptions(workers=workers, shuffle_buffer=256, resampled=True, image_size=64 if args.tiny else 224,
                             eval_resize=72 if args.tiny else 256, gpu_decode=gpu, skip_bad_samples=False)
        src = build_data("imagenet", shards, True, 64, plan, 0, 0, device, torch.float32, opts)
        batches = 4 if args.tiny else 40
        list(src.train_micro_batches(0))  # workers started, first batch: start-up
        sync(device)
        t0 = time.perf_counter()
        for step in range(1, batches + 1):
            list(src.train_micro_batches(step))
        sync(device)
        rate = batches * b / (time.perf_counter() - t0)
        out[f"{label}_images_per_second"] = rate
        out[f"{label}_fraction_of_in_gpu_rate"] = rate / in_gpu_rate
    out["workers"] = args.workers
    return out


def overhead(args, device: torch.device, work: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from overhead import bare_step_time, harness_step_time

    from data_pipelines.synth import synth

    shards = work / "cifar10-overhead"
    synth("cifar10", shards, train=512 if args.tiny else 4096, test=64)
    depth, width, steps = (10, 1, 3) if args.tiny else (16, 4, 60)
    harness = harness_step_time(shards, work, depth, width, 64, 2, 2 + steps, device=device.type)
    bare = bare_step_time(shards, depth, width, 64, steps, device=device.type)
    return {"model": f"wrn-{depth}-{width}", "batch": 64, "harness_ms": harness * 1e3, "bare_ms": bare * 1e3,
            "ratio": harness / bare}


def ghost_bn(args, device: torch.device) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ghost_bn import measure

    b = 128 if args.tiny else 1024
    ghost, plain = measure(torch.get_num_threads(), b, 64, 16 if args.tiny else 32, 3 if args.tiny else 30,
                           1 if args.tiny else 3, device.type)
    size = 16 if args.tiny else 32
    return {"input": [b, 64, size, size], "ghost_ms": ghost * 1e3, "batchnorm_ms": plain * 1e3,
            "ratio": ghost / plain}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu.json")
    p.add_argument("--tiny", action="store_true", help="tiny models and data: seconds, on any device (CI)")
    p.add_argument("--workers", type=int, default=8, help="loader workers for the JPEG figure (default 8)")
    p.add_argument("--only", nargs="+", choices=["wrn", "resnet", "jpeg", "overhead", "ghost_bn"], help="a subset")
    args = p.parse_args()
    if args.tiny:
        args.workers = min(args.workers, 2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    report = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or "cpu", "torch": torch.__version__, "tiny": args.tiny}
    started = time.time()
    wanted = args.only or ["wrn", "resnet", "jpeg", "overhead", "ghost_bn"]
    for name in wanted:
        t0 = time.time()
        try:
            if name == "wrn":
                report["wrn16_4"] = wrn(args, device, work)
            elif name == "resnet":
                report["resnet50"] = resnet(args, device)
            elif name == "jpeg":
                in_gpu = report.get("resnet50", {}).get("eager_images_per_second") or resnet(args, device)["eager_images_per_second"]
                report["jpeg"] = jpeg(args, device, work, in_gpu)
            elif name == "overhead":
                report["overhead"] = overhead(args, device, work)
            else:
                report["ghost_bn"] = ghost_bn(args, device)
        except Exception as e:  # noqa: BLE001 - one figure failing must not lose the others
            report[f"{name}_error"] = f"{type(e).__name__}: {e}"
        key = {"wrn": "wrn16_4", "resnet": "resnet50"}.get(name, name)
        print(f"gpu.py: {name} in {time.time() - t0:.0f} s: {json.dumps(report.get(key, report.get(name + '_error')))}",
              flush=True)
    report["seconds"] = time.time() - started
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"gpu.py: wrote {args.out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
