"""Run under torchrun by tests/test_ghost_bn.py: the cross-rank ghost-BN layer against one plain batch norm.

Every rank holds a consecutive slice of the same 64 examples (fp64). The ghost-BN layer normalizes its
slice with statistics shared over the ghost group's ranks (harness.train.distributed.ghost_bn_group); rank 0
compares the gathered outputs, input gradients, summed gamma/beta gradients and the running statistics
with nn.BatchNorm over all 64 examples in one process, and writes the maximum differences as JSON.

    torchrun --standalone --nproc-per-node 4 tests/ghost_bn_worker.py OUT.json [cpu|cuda]
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness.train import distributed  # noqa: E402
from models.ghost_bn import GhostBatchNorm, set_process_group, update_running_stats  # noqa: E402

G = 64


def gather(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def summed(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def compare(shape: tuple[int, ...], group, device) -> dict[str, float]:
    w, rank = dist.get_world_size(), dist.get_rank()
    k = G * w // shape[0]  # ranks per ghost group
    gen = torch.Generator().manual_seed(len(shape))
    c = shape[1]
    # Far-from-zero means stress the combination of the ranks' partial statistics.
    x_all = (3.0 + 2.0 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device)
    g_all = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
    gamma = (1.0 + 0.5 * torch.randn(c, generator=gen, dtype=torch.float64)).to(device)
    beta = torch.randn(c, generator=gen, dtype=torch.float64).to(device)
    m = shape[0] // w

    layer = GhostBatchNorm(c, G).to(device, torch.float64)
    with torch.no_grad():
        layer.weight.copy_(gamma)
        layer.bias.copy_(beta)
    set_process_group(layer, group)
    x = x_all[rank * m : (rank + 1) * m].clone().requires_grad_()
    y = layer(x)
    y.backward(g_all[rank * m : (rank + 1) * m])
    groups_counted = summed(layer.stat_accumulator[-1:]).item()
    update_running_stats(layer)
    y_all, dx_all = gather(y.detach()), gather(x.grad)
    dgamma, dbeta = summed(layer.weight.grad), summed(layer.bias.grad)

    # Reference: plain batch norm, one call per group of 64 consecutive examples, in this one process.
    ref = nn.BatchNorm1d(c) if len(shape) == 2 else nn.BatchNorm2d(c)
    ref = ref.to(device, torch.float64)
    with torch.no_grad():
        ref.weight.copy_(gamma)
        ref.bias.copy_(beta)
    xr = x_all.clone().requires_grad_()
    yr = torch.cat([ref(part) for part in xr.split(G)])
    yr.backward(g_all)
    # A layer that (wrongly) normalized each rank's slice alone: the test must be able to tell.
    local = torch.cat([F.batch_norm(p, None, None, gamma, beta, True, 0.0, 1e-5) for p in x_all.split(m)])
    # With several groups the reference's running stats saw them one after another; ours average them once.
    diff = lambda a, b: (a - b).abs().max().item()  # noqa: E731
    out = {
        "ranks_per_group": k,
        "groups_counted": groups_counted,
        "output": diff(y_all, yr),
        "input_grad": diff(dx_all, xr.grad),
        "gamma_grad": diff(dgamma, ref.weight.grad),
        "beta_grad": diff(dbeta, ref.bias.grad),
        "local_only_output": diff(local, yr),
    }
    if x_all.shape[0] == G:
        out["running_mean"] = diff(layer.running_mean, ref.running_mean)
        out["running_var"] = diff(layer.running_var, ref.running_var)
    return out


def main() -> None:
    out_path, device_kind = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "cpu")
    env = distributed.setup(device_kind)
    w = env.world_size
    group = distributed.ghost_bn_group(G // 16)  # 16 examples per rank: groups span 4 ranks
    results = {
        "2d": compare((16 * w, 6, 5, 5), group, env.device),
        "1d": compare((16 * w, 7), group, env.device),
    }
    if env.is_main:
        Path(out_path).write_text(json.dumps(results))
    distributed.teardown()


if __name__ == "__main__":
    main()
