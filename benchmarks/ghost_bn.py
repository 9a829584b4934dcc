"""Forward + backward time of the ghost-BN layer over nn.BatchNorm2d on the same input (issue 3).

    python benchmarks/ghost_bn.py [--batch 512] [--channels 64] [--size 16] [--repeats 30]

Input (B, C, H, W) = (512, 64, 16, 16) fp32 by default: 8 ghost groups of 64. Each timing is one forward,
a backward of a fixed random upstream gradient (a `.sum()` probe would feed an expanded constant gradient
instead of a real one), and gradient reset; warm-up first, then the median of `--repeats` runs, interleaving
the two layers so that machine noise hits both alike. Printed for one thread and for torch's default thread
count. The layer runs the implementation chosen for the device (models/ghost_bn.py, local_groups: per group on CPU,
batched on CUDA), printed with the figures; `--implementation batched|per_group` forces one. Figures and how they
were measured: docs/cpu_speed.md. Memory is allocated as in a harness training process (harness/core/memory.py:
freed memory kept; HARNESS_KEEP_FREED_MEMORY=0 for glibc's defaults), printed too. On a machine whose cores are oversubscribed, the multi-thread ratio of the
per-group path mostly measures OpenMP barrier stalls (8 groups: 8x the parallel regions of one nn.BatchNorm2d).
`--kernels` also times, on the whole input and one thread, the torch kernels that explain the CPU figures: batch
norm's training-mode forward (statistics and transform), its eval-mode forward (the transform alone) and one
per-channel sum (the reduction the per-group path takes its statistics with, twice).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness.core.memory import keep_freed_memory  # noqa: E402
from models.ghost_bn import GhostBatchNorm2d, implementation_for  # noqa: E402


def fwd_bwd(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    x.grad = None
    layer.zero_grad(set_to_none=True)
    layer(x).backward(grad)


def timed(layer, x, grad, sync) -> float:
    """One forward + backward, timed to its end on the device (CUDA kernels run asynchronously)."""
    sync()
    t0 = time.perf_counter()
    fwd_bwd(layer, x, grad)
    sync()
    return time.perf_counter() - t0


def measure(threads: int, b: int, c: int, size: int, repeats: int, warmup: int, device: str,
            implementation: str = "auto") -> tuple[float, float]:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, size, size, generator=gen).to(device).requires_grad_()
    grad = torch.randn(b, c, size, size, generator=gen).to(device)
    ghost, plain = GhostBatchNorm2d(c, 64, implementation=implementation).to(device), nn.BatchNorm2d(c).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fwd_bwd(ghost, x, grad)
        fwd_bwd(plain, x, grad)
    t_ghost, t_plain = [], []
    for _ in range(repeats):
        t_ghost.append(timed(ghost, x, grad, sync))
        t_plain.append(timed(plain, x, grad, sync))
    return statistics.median(t_ghost), statistics.median(t_plain)


def kernels(b: int, c: int, size: int, repeats: int) -> None:
    """Median times of single torch kernels on the whole (b, c, size, size) input, one thread."""
    torch.set_num_threads(1)
    x = torch.randn(b, c, size, size, generator=torch.Generator().manual_seed(0))
    weight, bias, mean, var = torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c)
    cases = {
        "batch norm forward, training mode (statistics + transform)":
            lambda: torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, 1e-5),
        "batch norm forward, eval mode (transform only)":
            lambda: torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, 1e-5),
        "one per-channel sum, x.sum((0, 2, 3))": lambda: x.sum((0, 2, 3)),
    }
    for name, fn in cases.items():
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        print(f"kernel  {statistics.median(times) * 1e3:8.3f} ms   {name}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--implementation", choices=["auto", "batched", "per_group"], default="auto",
                   help="the ghost layer's local-groups implementation (default: the one chosen for the device)")
    p.add_argument("--kernels", action="store_true",
                   help="also time torch's training- and eval-mode batch-norm forward and one per-channel sum (CPU)")
    args = p.parse_args()
    malloc = keep_freed_memory()  # as in every harness training process (harness/core/memory.py)
    default_threads = torch.get_num_threads()
    print(f"ghost BN (groups of 64) vs nn.BatchNorm2d, fwd+bwd, input ({args.batch}, {args.channels}, "
          f"{args.size}, {args.size}) fp32 on {args.device}; median of {args.repeats} after {args.warmup} warm-up")
    print(f"malloc: {malloc}")
    chosen = args.implementation
    if chosen == "auto":
        chosen = implementation_for(torch.device(args.device).type, torch.float32, torch.float32)
    for threads in sorted({1, default_threads}):
        ghost, plain = measure(threads, args.batch, args.channels, args.size, args.repeats, args.warmup, args.device,
                               args.implementation)
        print(f"threads={threads:<3d} ghost ({chosen}) {ghost * 1e3:8.3f} ms   BatchNorm2d {plain * 1e3:8.3f} ms   "
              f"ratio {ghost / plain:.3f}")
    if args.kernels:
        kernels(args.batch, args.channels, args.size, args.repeats)


if __name__ == "__main__":
    main()
