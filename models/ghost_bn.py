"""Ghost batch normalization (Hoffer et al. 2017; the paper's sec. 3.2 and 4).

Training statistics come from fixed groups of G consecutive examples of the global batch, never from
the micro-batch a rank happens to hold, so the normalization is the same at every layout. The batch
plan (harness.plan) guarantees each rank's micro-batch is a whole number of groups (m a multiple of G).

Running statistics (used for evaluation) are NOT updated in forward. Each forward adds every group's
mean and unbiased variance to an accumulator; `update_running_stats` is called once per optimizer step,
sums the accumulators over all ranks, and moves the running statistics towards the mean over all groups
of the global batch. Evaluation is then independent of the layout too.

This is the one model file that may use torch.distributed (house style 5).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class GhostBatchNorm(nn.Module):
    """Batch norm over groups of `ghost_batch_size` consecutive examples; any input (N, C, *)."""

    def __init__(self, num_features: int, ghost_batch_size: int = 64, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features = num_features
        self.ghost_batch_size = ghost_batch_size
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        # [sum of group means (C), sum of group variances (C), number of groups (1)] since the last update.
        self.register_buffer("stat_accumulator", torch.zeros(2 * num_features + 1), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.num_features}, ghost_batch_size={self.ghost_batch_size}, eps={self.eps}, momentum={self.momentum}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        g = self.ghost_batch_size
        if x.shape[0] % g:
            raise RuntimeError(
                f"GhostBatchNorm got {x.shape[0]} examples, not a multiple of ghost_batch_size={g}; "
                "the batch plan should have prevented this"
            )
        groups = x.shape[0] // g
        # One native batch_norm per contiguous group: identical arithmetic for a group whatever the layout.
        # With momentum 1 the "running" outputs are exactly the group's mean and unbiased variance.
        stats = torch.zeros(2, groups, self.num_features, dtype=self.running_mean.dtype, device=x.device)
        outs = [
            F.batch_norm(xg, stats[0, i], stats[1, i], self.weight, self.bias, True, 1.0, self.eps)
            for i, xg in enumerate(x.split(g))
        ]
        acc = self.stat_accumulator
        acc[: self.num_features] += stats[0].sum(0)
        acc[self.num_features : -1] += stats[1].sum(0)
        acc[-1] += groups
        return outs[0] if groups == 1 else torch.cat(outs)


GhostBatchNorm1d = GhostBatchNorm  # (N, C) or (N, C, L)
GhostBatchNorm2d = GhostBatchNorm  # (N, C, H, W)


def ghost_bn_layers(model: nn.Module) -> list[GhostBatchNorm]:
    return [m for m in model.modules() if isinstance(m, GhostBatchNorm)]


@torch.no_grad()
def update_running_stats(model: nn.Module) -> None:
    """Once per optimizer step: fold the statistics of every ghost group of the global batch, summed
    over all ranks, into the running statistics. Every rank must call it (one all-reduce)."""
    layers = ghost_bn_layers(model)
    if not layers:
        return
    flat = torch.cat([layer.stat_accumulator for layer in layers])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat)
    offset = 0
    for layer in layers:
        c = layer.num_features
        acc = flat[offset : offset + 2 * c + 1]
        offset += 2 * c + 1
        count = acc[-1]
        if count > 0:
            layer.running_mean.mul_(1 - layer.momentum).add_(acc[:c] / count, alpha=layer.momentum)
            layer.running_var.mul_(1 - layer.momentum).add_(acc[c : 2 * c] / count, alpha=layer.momentum)
        layer.stat_accumulator.zero_()
