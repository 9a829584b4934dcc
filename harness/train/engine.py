"""How gradients of the global-batch mean are computed and applied: plain (one process), DDP, or DeepSpeed.

The objective returns a SUM over its micro-batch. DDP averages gradients over the W ranks, so each
rank back-propagates W * sum / count_global: after the reduction the gradient is exactly the mean over
the B examples of the global batch (eq. 1), however B is split over ranks and micro-steps.
DDP skips the all-reduce (`no_sync`) on all but the last micro-step: one reduction per optimizer step.
`DeepSpeedEngine` (backend: deepspeed, deepspeed_engine.py) has the same interface and arithmetic.

Nothing here reads a value back to the host: norms are returned as device tensors and the trainer reads them
at log intervals, so the host can queue the next step while the device runs this one.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from harness.recipe.optim import set_lr
from harness.train.noise_scale import NoiseScale, squared_norm
from models.ghost_bn import update_running_stats


class EngineBase:
    """What both engines share: autocast, the optimizer step with its norms, the gradient noise scale, the
    checkpoint payload. Subclasses set module, optimizer, plan, autocast_dtype, device_type and local_clip, and
    define micro_step() and _apply()."""

    local_clip: float | None = None  # clip here (DDP); DeepSpeed clips itself (gradient_clipping)
    noise: NoiseScale | None = None

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def enable_noise_scale(self, decay: float) -> bool:
        """Measure B_simple every step (harness/train/noise_scale.py); False where this layout has no smaller
        batch than B before a reduction (world size 1 without accumulation, or DeepSpeed without accumulation)."""
        plan = self.plan
        if plan.accumulation_steps >= 2:
            small = plan.micro_batch_size  # each rank's first micro-step, before any reduction
        elif plan.world_size >= 2 and isinstance(self, DDPEngine):
            small = plan.global_batch_size // plan.world_size  # each rank's gradient, in the DDP comm hook
            self.ddp.register_comm_hook(self, _local_norm_hook)
        else:
            return False
        self._small_sq = torch.zeros((), dtype=torch.float64, device=self.device)
        self.noise = NoiseScale(small, plan.global_batch_size, decay, self.device)
        return True

    def _after_backward(self, accum_index: int) -> None:
        """|G_m|^2 of this rank's first micro-step (A >= 2): its gradient is still local, before any reduction."""
        if self.noise is None or accum_index != 0 or self.plan.accumulation_steps < 2:
            return
        p = self.plan
        rescale = p.global_batch_size / (p.world_size * p.micro_batch_size)  # p.grad = (W m / B) x the mean over m
        self._small_sq = squared_norm([q.grad for q in self.module.parameters() if q.grad is not None]) * rescale ** 2

    def step(self, lr: float, want_norms: bool) -> dict[str, torch.Tensor]:
        """After the last micro-step: BN running statistics, the noise scale, clipping, the SGD step. Returns
        norms as device tensors if asked (the gradient norm before clipping, the parameter norm and the update
        norm after the step)."""
        update_running_stats(self.module)
        params = [p for p in self.module.parameters() if p.grad is not None]
        norms = {}
        if want_norms or self.local_clip is not None or self.noise is not None:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if self.noise is not None:
                self.noise.observe(self._mean_over_ranks(self._small_sq), grad_norm.double().square())
                self._small_sq = torch.zeros_like(self._small_sq)
            if self.local_clip is not None:
                torch.nn.utils.clip_grads_with_norm_(params, self.local_clip, grad_norm)
            norms["grad_norm"] = grad_norm
        before = [p.detach().clone() for p in params] if want_norms else None
        set_lr(self.optimizer, lr)
        self._apply()
        if want_norms:
            norms["param_norm"] = torch.nn.utils.get_total_norm([p.detach() for p in params])
            norms["update_norm"] = torch.nn.utils.get_total_norm([p.detach() - b for p, b in zip(params, before)])
            if self.noise is not None:
                norms.update(self.noise.values())
        elif "grad_norm" in norms:
            del norms["grad_norm"]
        return norms

    def _mean_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        if self.plan.world_size > 1:
            t = t.clone()
            dist.all_reduce(t)  # a device collective: the host does not wait for it
            t = t / self.plan.world_size
        return t

    def _apply(self) -> None:
        raise NotImplementedError

    def compile(self) -> None:
        """speed.compile: the training forward through torch.compile (inductor). Evaluation runs the module eagerly."""
        self.model = torch.compile(self.model)

    def state_dict(self) -> dict:
        # Both engines step the same torch SGD with fp32 (or fp64) weights: one payload, so a checkpoint
        # resumes under either backend.
        state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.noise is not None:
            state["noise_scale"] = self.noise.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.noise is not None:
            self.noise.load_state_dict(state.get("noise_scale", {}))


def _local_norm_hook(engine, bucket):
    """DDP communication hook (noise scale at A = 1, W >= 2): add the squared norm of this bucket of the rank's
    local gradient (the mean over its B / W examples), then all-reduce it as DDP's default hook does.
    No annotations: DDP compares them with dist.GradBucket and torch.futures.Future, and under this module's
    `from __future__ import annotations` they are strings, which register_comm_hook refuses (ValueError)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    engine._small_sq = engine._small_sq + bucket.buffer().double().square().sum()
    return allreduce_hook(None, bucket)


class DDPEngine(EngineBase):
    """backend: ddp (and a plain single process): torch DistributedDataParallel when W > 1."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, plan, device: torch.device,
                 precision: str, grad_clip_norm: float | None):
        self.module = model
        self.optimizer = optimizer
        self.plan = plan
        self.world_size = plan.world_size
        self.device = device
        self.local_clip = grad_clip_norm
        self.ddp = None
        if self.world_size > 1:
            # broadcast_buffers=False: DDP would otherwise overwrite every rank's BN running statistics
            # with rank 0's each forward; ghost_bn.update_running_stats keeps them identical instead.
            # torch deprecates broadcast_buffers for forward_sync_buffers, but says to keep broadcast_buffers=False
            # where buffers must not be synced at init (torch/nn/parallel/distributed.py); its FutureWarning is
            # the same on every rank, so rank 0 alone shows it: once per job, not once per rank.
            with warnings.catch_warnings():
                if dist.get_rank() != 0:
                    warnings.simplefilter("ignore", FutureWarning)
                self.ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                               broadcast_buffers=False, gradient_as_bucket_view=True)
        self.model = self.ddp or model  # what the training forward calls (compiled by speed.compile)
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.device_type = device.type

    def micro_step(self, objective, batch, global_count: float, accum_index: int) -> torch.Tensor:
        """Forward and backward one micro-batch; return its detached stats vector."""
        last = accum_index == self.plan.accumulation_steps - 1
        sync = contextlib.nullcontext() if (last or self.ddp is None) else self.ddp.no_sync()
        with sync:
            with self.autocast():
                loss_sum, stats = objective(self.model, batch)
            (loss_sum * (self.world_size / global_count)).backward()
        self._after_backward(accum_index)
        return stats

    def _apply(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
