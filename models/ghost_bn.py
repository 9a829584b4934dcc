"""Ghost batch normalization (Hoffer et al. 2017; the paper's sec. 3.2 and 4), on one rank or across ranks.

Training statistics come from fixed groups of G consecutive examples of the global batch, never from
the micro-batch a rank happens to hold, so the normalization is the same at every layout. The batch
plan (harness.recipe.batch_plan) guarantees one of two cases:

- m >= G (m a multiple of G): every group lies inside one rank's micro-batch, with no communication at all. On a
  GPU all groups are normalized in one batched computation (`_LocalGroups`: one reduction over a (groups, G, C,
  positions) view, no copy, no kernel launch per group); on CPU group by group, each contiguous group slice by
  vectorized torch kernels (`_PerGroupNative`), which makes ghost BN cost less than one nn.BatchNorm2d there.
  `local_groups` picks one by device and dtype; both are the same arithmetic (tests/test_ghost_bn.py: equal in
  fp64, also under vmap).
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

import functools

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


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Statistics in fp32 at least (bf16 / fp16 activations under autocast)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _LocalGroups(torch.autograd.Function):
    """Batch norm of every group of g consecutive examples at once: one reduction over a (groups, g, C, S) view
    of the input, one elementwise pass out, and the same in backward, whatever the number of groups.

    No copy and no per-group kernel launch: the view works for contiguous and channels_last tensors alike, and the
    output keeps the input's memory format. The arithmetic is batch norm's (biased variance normalizes; torch's
    formula for the input gradient), so it equals one F.batch_norm per group to round-off (tests/test_ghost_bn.py,
    in fp64). Written as torch operations with `setup_context`, so torch.func.vmap (packed runs) and torch.compile
    can trace it. Returns y and each group's (mean, unbiased variance) (groups, C) for the running statistics.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, g: int, eps: float):
        n, c = x.shape[0], x.shape[1]
        xs = _upcast(x)
        v = xs.view(n // g, g, c, -1)  # (groups, examples of a group, channels, positions), no copy
        var, mean = torch.var_mean(v, dim=(1, 3), correction=0)
        invstd = torch.rsqrt(var + eps)
        scale = invstd * weight
        # One elementwise pass over the input's own shape (a fresh tensor in its memory format, not a view: layers
        # after it, ReLU(inplace=True), modify it), with each group's scale and shift repeated per example.
        y = torch.addcmul(_per_example(bias - mean * scale, g, x), xs, _per_example(scale, g, x))
        m = g * v.shape[3]
        return y.to(x.dtype), mean, var * (m / max(m - 1, 1)), invstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, g, _ = inputs
        _, mean, _, invstd = output
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.g = g
        ctx.mark_non_differentiable(mean, output[2], invstd)

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var, _grad_invstd):
        x, weight, mean, invstd = ctx.saved_tensors
        g, n, c = ctx.g, x.shape[0], x.shape[1]
        xs, dys = _upcast(x), _upcast(grad_y)
        v, dy = xs.view(n // g, g, c, -1), dys.reshape(n // g, g, c, -1)
        m = g * v.shape[3]
        sum_dy = dy.sum((1, 3))  # (groups, C): the group's beta gradient
        sum_dy_xhat = (dy * v).sum((1, 3)).sub_(mean * sum_dy).mul_(invstd)  # sum of dy * x_hat: gamma's
        # dx = gamma invstd (dy - mean(dy) - x_hat mean(dy x_hat)) = a dy + b x + c, per (group, channel).
        a = invstd * weight
        b = -a * invstd * sum_dy_xhat / m
        cst = -a * sum_dy / m - b * mean
        dx = torch.addcmul(torch.addcmul(_per_example(cst, g, x), xs, _per_example(b, g, x)), dys, _per_example(a, g, x))
        return dx.to(x.dtype), sum_dy_xhat.sum(0).to(weight.dtype), sum_dy.sum(0).to(weight.dtype), None, None


def _per_example(t: torch.Tensor, g: int, like: torch.Tensor) -> torch.Tensor:
    """(groups, C) -> (N, C, 1, ...): each group's values for each of its g examples, broadcasting against `like`."""
    return t.repeat_interleave(g, dim=0).view(-1, t.shape[1], *([1] * (like.dim() - 2)))


class _PerGroupNative(torch.autograd.Function):
    """CPU: each group of g consecutive examples normalized on its own contiguous slice, straight into one output.

    The batched `_LocalGroups` reduces over a strided (groups, g, C, positions) view and broadcasts per-example
    scale tensors: right for a GPU (one launch per pass), but on CPU it runs about 2x nn.BatchNorm2d. Per group,
    this one takes the statistics with two vectorized reductions (mean, then the centred sum of squares, as torch's
    batch norm defines them) and normalizes with torch's eval-mode batch-norm kernel, the statistics as its
    "running" ones; backward is torch's own batch-norm backward kernel per group. torch's training-mode CPU forward
    accumulates its statistics in a scalar loop, so this measures below one nn.BatchNorm2d over the whole batch
    (benchmarks/ghost_bn.py, docs/cpu_speed.md). Same arithmetic as one F.batch_norm per group (the implementation
    before the batched one), so it equals `_LocalGroups` to round-off (tests/test_ghost_bn.py, fp64, forward and
    backward, alone and under vmap).

    weight and bias are (P, C): P runs of a pack (1 outside vmap), whose groups follow each other in x, so group i
    uses row i // (groups / P). The `vmap` rule folds the run dimension into the groups that way: a pack's forward
    stays one loop over groups, with each run's own gamma and beta. Returns y and each group's (mean, unbiased
    variance) (groups, C), as `_LocalGroups`, plus each group's (mean, 1/std) for backward.
    """

    @staticmethod
    def forward(x, weight, bias, g: int, eps: float):
        groups, c = x.shape[0] // g, x.shape[1]
        per = groups // weight.shape[0]
        dims = (0, *range(2, x.dim()))  # a group's examples and positions
        shape = (c, *([1] * (x.dim() - 2)))  # a (C,) vector against one example's (C, *)
        m = g * (x[0, 0].numel() if x.dim() > 2 else 1)  # values per (group, channel)
        count = torch.tensor(m, dtype=x.dtype)  # a 0-dim divisor: dispatched faster than a Python number
        y = torch.empty_like(x)  # the input's memory format: a group slice of it is contiguous in that format
        stats = x.new_empty(2, groups, c)  # each group's mean and biased variance
        # Every view the loop needs, made in a few calls (chunk / unbind), not several indexing calls per group.
        xs, ys, ws, bs = x.chunk(groups), y.chunk(groups), weight.unbind(0), bias.unbind(0)
        means, variances = stats[0].unbind(0), stats[1].unbind(0)
        unused = x.new_empty(0), x.new_empty(0)  # the transform's (eval mode) save_mean / save_invstd: left empty
        for i in range(groups):
            # Statistics in two vectorized passes, as torch's own batch norm computes them (mean, then the centred
            # sum of squares; no E[x^2] - E[x]^2 cancellation), the squared deviations (x - mean)^2 written into the
            # group's output slice as scratch, in one pass (mse_loss without reduction). torch's training-mode CPU
            # kernel accumulates its statistics in a scalar loop: about 4x slower (docs/cpu_speed.md). Then its
            # eval-mode transform, (x - mean) / sqrt(var + eps) * gamma + beta, straight into the slice.
            mean = torch.sum(xs[i], dims, out=means[i]).div_(count)
            squares = torch.ops.aten.mse_loss.out(xs[i], mean.view(shape).expand_as(xs[i]), 0, out=ys[i])
            var = torch.sum(squares, dims, out=variances[i]).div_(count)
            torch.native_batch_norm(xs[i], ws[i // per], bs[i // per], mean, var, False, 0.0, eps,
                                    out=(ys[i], *unused))
        invstd = torch.rsqrt(stats[1] + eps)  # biased variance normalizes, as in F.batch_norm
        return y, stats[0], stats[1] * (m / max(m - 1, 1)), torch.stack([stats[0], invstd])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, g, eps = inputs
        ctx.save_for_backward(x, weight, output[3])
        ctx.g, ctx.eps = g, eps
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var, _grad_saved):
        x, weight, saved = ctx.saved_tensors
        g, eps = ctx.g, ctx.eps
        groups = x.shape[0] // g
        per = groups // weight.shape[0]
        grad_x = torch.empty_like(x)
        # Each group's gradients by torch's own kernel, its input gradient copied into the group's slice of grad_x
        # (the kernel has no true out= form on CPU: its `.out` overload is the same copy behind more dispatch).
        # Measured faster than one batch norm's backward over the whole batch, whose 32 MB working set leaves the
        # cache, and than concatenating the groups' results at the end.
        xs, dys, gxs, ws = x.chunk(groups), grad_y.chunk(groups), grad_x.chunk(groups), weight.unbind(0)
        save_means, save_invstds = saved[0].unbind(0), saved[1].unbind(0)
        backward = torch.ops.aten.native_batch_norm_backward.default
        grad_ws, grad_bs = [], []
        for i in range(groups):
            gx, gw, gb = backward(dys[i], xs[i], ws[i // per], None, None, save_means[i], save_invstds[i], True, eps,
                                  [True, True, True])
            gxs[i].copy_(gx)
            grad_ws.append(gw)
            grad_bs.append(gb)
        # Each run's gamma and beta gradients: the sums over its `per` consecutive groups, added in group order
        # (the same order for every run of a pack and for a run alone).
        parts = torch.stack([torch.stack(grad_ws), torch.stack(grad_bs)]).view(2, weight.shape[0], per, -1)
        sums = parts[:, :, 0].clone()
        for j in range(1, per):
            sums.add_(parts[:, :, j])
        grad_w, grad_b = sums[0], sums[1]
        return grad_x, grad_w, grad_b, None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, g: int, eps: float):
        """R runs (torch.func.vmap, packed runs): (R, N, C, *) as R * N examples, run r's groups after run r - 1's."""
        r = info.batch_size
        x, weight, bias = (_runs_first(t, d, r) for t, d in zip((x, weight, bias), in_dims[:3]))
        y, mean, var, saved = _PerGroupNative.apply(x, weight, bias, g, eps)
        return ((y.view(r, -1, *y.shape[1:]), mean.view(r, -1, mean.shape[-1]), var.view(r, -1, var.shape[-1]),
                 saved.view(2, r, -1, saved.shape[-1])), (0, 0, 0, 1))


def _runs_first(t: torch.Tensor, dim, runs: int) -> torch.Tensor:
    """A vmap rule's physical tensor with the run dimension first (expanded when not batched), the runs folded
    into the leading dimension: (R * P, ...) for a logical (P, ...)."""
    t = t.expand(runs, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.reshape(runs * t.shape[1], *t.shape[2:])


# The implementation of the local groups (m >= G) for a device, its activations' and weights' dtypes.
BATCHED, PER_GROUP = "batched", "per_group"


@functools.lru_cache(maxsize=None)
def implementation_for(device_type: str, dtype: torch.dtype, weight_dtype: torch.dtype) -> str:
    """per_group (`_PerGroupNative`) for CPU tensors in the weights' fp32 / fp64; batched (`_LocalGroups`) on every
    other device (CUDA: one launch per pass whatever the number of groups) and for mixed precision (its fp32
    statistics). Decided from attributes of the tensors, never their values (no host sync), once per combination."""
    if device_type == "cpu" and dtype == weight_dtype and dtype in (torch.float32, torch.float64):
        return PER_GROUP
    return BATCHED


def local_groups(x, weight, bias, g: int, eps: float, implementation: str = "auto"):
    """Every group of g consecutive examples of x normalized on its own: (y, each group's mean, unbiased variance).
    `implementation`: auto (by device, `implementation_for`), batched or per_group. Under torch.compile auto is
    batched: that Function is written in plain torch operations for tracing, and inductor fuses its passes."""
    if implementation == "auto":
        implementation = BATCHED if torch.compiler.is_compiling() else implementation_for(x.device.type, x.dtype, weight.dtype)
    if implementation == PER_GROUP:
        y, mean, var, _ = _PerGroupNative.apply(x, weight.unsqueeze(0), bias.unsqueeze(0), g, eps)
    else:
        y, mean, var, _ = _LocalGroups.apply(x, weight, bias, g, eps)
    return y, mean, var


class GhostBatchNorm(nn.Module):
    """Batch norm over groups of `ghost_batch_size` consecutive examples; any input (N, C, *)."""

    normalizes = True  # a normalization layer: its gamma and beta may be exempt from weight decay (recipe.optim)

    def __init__(self, num_features: int, ghost_batch_size: int = 64, eps: float = 1e-5, momentum: float = 0.1,
                 implementation: str = "auto"):
        super().__init__()
        if implementation not in ("auto", BATCHED, PER_GROUP):
            raise ValueError(f"GhostBatchNorm implementation {implementation!r}: auto, {BATCHED} or {PER_GROUP}")
        # Local groups (m >= G): auto picks by device (local_groups); batched / per_group force one (tests, benchmarks).
        self.implementation = implementation
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
        y, mean, var = local_groups(x, self.weight, self.bias, g, self.eps, self.implementation)
        acc = self.stat_accumulator
        acc[: self.num_features] += mean.sum(0).to(acc.dtype)
        acc[self.num_features : -1] += var.sum(0).to(acc.dtype)
        acc[-1] += x.shape[0] // g
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
        fold_statistics(layer.running_mean, layer.running_var, flat[offset : offset + 2 * c + 1], layer.momentum)
        offset += 2 * c + 1
        layer.stat_accumulator.zero_()


def fold_statistics(running_mean: torch.Tensor, running_var: torch.Tensor, acc: torch.Tensor, momentum: float) -> None:
    """Move running statistics towards the mean of the groups in `acc` ([sum of means, sum of variances, count]
    over the last dimension), in place. Works alike on one layer's (C,) statistics and on a pack's stacked (R, C)
    ones. Tensor arithmetic, no `if count > 0` on the host (a device sync per layer): statistics that saw no group
    this step (momentum 0 then) stay as they are."""
    c = running_mean.shape[-1]
    count = acc[..., -1:]
    weight = (momentum * (count > 0).to(acc.dtype)).to(running_mean.dtype)
    total = count.clamp(min=1)
    running_mean.lerp_((acc[..., :c] / total).to(running_mean.dtype), weight)
    running_var.lerp_((acc[..., c : 2 * c] / total).to(running_var.dtype), weight)
