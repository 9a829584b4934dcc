"""Ghost batch normalization (Hoffer et al. 2017; the paper's sec. 3.2 and 4), on one rank or across ranks.

Training statistics come from fixed groups of G consecutive examples of the global batch, never from
the micro-batch a rank happens to hold, so the normalization is the same at every layout. The batch
plan (harness.recipe.batch_plan) guarantees one of two cases:

- m >= G (m a multiple of G): every group lies inside one rank's micro-batch. Each group is one call of
  the native batch-norm kernels on a contiguous slice: identical arithmetic for a group whatever the layout,
  and no communication at all.
- m < G (G a multiple of m): a group spans G/m consecutive ranks of the same micro-step. Each rank computes
  its slice's per-channel mean and centred sum of squares, the group's ranks all-gather them and combine
  them exactly (Chan et al.'s pairwise formula); backward all-reduces the two per-channel sums the batch-norm
  gradient needs (`_AcrossRanks`, an autograd Function: one collective forward, one backward), so forward
  and backward are those of one G-example batch norm. The process group of a rank's ghost group is made
  once at start by harness.train.distributed.ghost_bn_group and handed to the layers by `set_process_group`.

Running statistics (used for evaluation) are NOT updated in forward. Each forward adds every group's
mean and unbiased variance to an accumulator (a group spanning ranks is added by its first rank only, so
every group counts exactly once); `update_running_stats` is called once per optimizer step, sums the
accumulators over all ranks, and moves the running statistics towards the mean over all groups of the
global batch. Evaluation is then independent of the layout too.

This is the one model file that may use torch.distributed: a group may span ranks, and only the layer knows
which tensors to reduce; every other model stays unaware of parallelism.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class _AcrossRanks(torch.autograd.Function):
    """Batch norm of one ghost group spread over the ranks of `group`, each holding an equal share (m < G).

    Forward: each rank's per-channel mean and centred sum of squares, all-gathered in the group and combined
    exactly (Chan et al.'s pairwise formula for equal counts), then the usual normalization of the local
    share. Backward (as torch's SyncBatchNorm): one all-reduce of the per-channel sums of dy and dy * x_hat,
    then dx = gamma * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)) over the whole group. gamma/beta
    gradients are this rank's share (DDP adds the shares). Only x and two C-vectors are kept for backward.
    Returns y and the group's (mean, unbiased variance) for the running statistics.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, group):
        k = dist.get_world_size(group)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # statistics in fp32 at least
        n_local = x.numel() // x.shape[1]
        mean_local = xs.mean(dims)
        m2_local = (xs - mean_local.view(shape)).square().sum(dims)
        parts = [torch.empty(2, x.shape[1], dtype=xs.dtype, device=x.device) for _ in range(k)]
        dist.all_gather(parts, torch.stack([mean_local, m2_local]), group=group)
        means, m2s = torch.stack(parts).unbind(1)
        mean = means.mean(0)
        m2 = m2s.sum(0) + n_local * (means - mean).square().sum(0)
        n = n_local * k
        invstd = torch.rsqrt(m2 / n + eps)  # biased variance normalizes, as in F.batch_norm
        y = (xs - mean.view(shape)) * (invstd * weight).view(shape) + bias.view(shape)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.group, ctx.n = group, n
        var = m2 / (n - 1)
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype), mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, mean, invstd = ctx.saved_tensors
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        gy = grad_y.to(xs.dtype)
        x_hat = (xs - mean.view(shape)) * invstd.view(shape)
        local = torch.stack([gy.sum(dims), (gy * x_hat).sum(dims)])  # this rank's beta and gamma gradients
        total = local.clone()
        dist.all_reduce(total, group=ctx.group)
        grad_x = (gy - (total[0] / ctx.n).view(shape) - x_hat * (total[1] / ctx.n).view(shape)) * (invstd * weight).view(shape)
        return grad_x.to(x.dtype), local[1].to(weight.dtype), local[0].to(weight.dtype), None, None


class _LocalGroups(torch.autograd.Function):
    """Native batch norm per contiguous group of g examples, written straight into one output (CPU).

    Exactly the kernels F.batch_norm runs on each group, so outputs and input gradients are bitwise those
    of the per-group F.batch_norm loop (tests/test_ghost_bn.py), without its torch.cat copy and one autograd
    node per group (benchmarks/ghost_bn.py, one thread, B = 512: the loop took 1.1-1.3x nn.BatchNorm2d's
    time, this 1.08-1.13x). `stats` (2, groups, C) receives each group's mean and unbiased variance.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, g: int, eps: float, stats):
        groups = x.shape[0] // g
        y = torch.empty_like(x)
        save_mean, save_invstd = stats.new_empty(groups, x.shape[1]), stats.new_empty(groups, x.shape[1])
        for i in range(groups):
            part = slice(i * g, (i + 1) * g)
            torch.ops.aten.native_batch_norm.out(x[part], weight, bias, stats[0, i], stats[1, i], True, 1.0, eps,
                                                 out=y[part], save_mean=save_mean[i], save_invstd=save_invstd[i])
        ctx.save_for_backward(x, weight, save_mean, save_invstd)
        ctx.g, ctx.eps = g, eps
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight, save_mean, save_invstd = ctx.saved_tensors
        g = ctx.g
        grad_x = torch.empty_like(x)
        grad_w, grad_b = torch.zeros_like(weight), torch.zeros_like(weight)
        part_w, part_b = torch.empty_like(weight), torch.empty_like(weight)
        for i in range(x.shape[0] // g):
            part = slice(i * g, (i + 1) * g)
            torch.ops.aten.native_batch_norm_backward.out(
                grad_y[part], x[part], weight, None, None, save_mean[i], save_invstd[i], True, ctx.eps,
                [True, True, True], out0=grad_x[part], out1=part_w, out2=part_b)
            grad_w += part_w
            grad_b += part_b
        return grad_x, grad_w, grad_b, None, None, None


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
        # Set by set_process_group when a ghost group spans ranks (m < G); None: groups are local.
        self.process_group = None

    def extra_repr(self) -> str:
        return f"{self.num_features}, ghost_batch_size={self.ghost_batch_size}, eps={self.eps}, momentum={self.momentum}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        if self.process_group is not None:
            return self._forward_across_ranks(x)
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
        if x.device.type == "cpu" and x.dtype == self.weight.dtype == stats.dtype:
            y = _LocalGroups.apply(x, self.weight, self.bias, g, self.eps, stats)
        else:  # GPU (cuDNN) and mixed precision: the same per-group calls through F.batch_norm
            outs = [
                F.batch_norm(xg, stats[0, i], stats[1, i], self.weight, self.bias, True, 1.0, self.eps)
                for i, xg in enumerate(x.split(g))
            ]
            y = outs[0] if groups == 1 else torch.cat(outs)
        acc = self.stat_accumulator
        acc[: self.num_features] += stats[0].sum(0)
        acc[self.num_features : -1] += stats[1].sum(0)
        acc[-1] += groups
        return y

    def _forward_across_ranks(self, x: torch.Tensor) -> torch.Tensor:
        group = self.process_group
        k = dist.get_world_size(group)
        if x.shape[0] * k != self.ghost_batch_size:
            raise RuntimeError(
                f"GhostBatchNorm across {k} ranks got {x.shape[0]} examples per rank, not "
                f"ghost_batch_size/{k} = {self.ghost_batch_size / k:g}; the batch plan should have prevented this"
            )
        y, mean, var = _AcrossRanks.apply(x, self.weight, self.bias, self.eps, group)
        if dist.get_rank(group) == 0:  # the group's statistics, counted once for the running averages
            acc = self.stat_accumulator
            acc[: self.num_features] += mean.to(acc.dtype)
            acc[self.num_features : -1] += var.to(acc.dtype)
            acc[-1] += 1
        return y


GhostBatchNorm1d = GhostBatchNorm  # (N, C) or (N, C, L)
GhostBatchNorm2d = GhostBatchNorm  # (N, C, H, W)


def ghost_bn_layers(model: nn.Module) -> list[GhostBatchNorm]:
    return [m for m in model.modules() if isinstance(m, GhostBatchNorm)]


def set_process_group(model: nn.Module, group) -> None:
    """Give every ghost-BN layer the process group of this rank's ghost group (from
    harness.train.distributed.ghost_bn_group), or None when groups are local (m >= G: no communication)."""
    for layer in ghost_bn_layers(model):
        layer.process_group = group


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
