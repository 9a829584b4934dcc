"""How gradients of the global-batch mean are computed and applied: plain (one process), DDP, or DeepSpeed.

The objective returns a SUM over its micro-batch. DDP averages gradients over the W ranks, so each
rank back-propagates W * sum / count_global: after the reduction the gradient is exactly the mean over
the B examples of the global batch (eq. 1), however B is split over ranks and micro-steps.
DDP skips the all-reduce (`no_sync`) on all but the last micro-step: one reduction per optimizer step.
`DeepSpeedEngine` (backend: deepspeed, deepspeed_engine.py) has the same interface and arithmetic.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from harness.recipe.optim import set_lr
from models.ghost_bn import update_running_stats


class EngineBase:
    """What both engines share: autocast, the optimizer step with its norms, the checkpoint payload.
    Subclasses set module, optimizer, autocast_dtype, device_type and local_clip, and define _apply()."""

    local_clip: float | None = None  # clip here (DDP); DeepSpeed clips itself (gradient_clipping)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def step(self, lr: float, want_norms: bool) -> dict[str, float]:
        """After the last micro-step: BN running statistics, clipping, the SGD step. Returns norms if asked
        (the gradient norm before clipping, the parameter norm and the update norm after the step)."""
        update_running_stats(self.module)
        params = [p for p in self.module.parameters() if p.grad is not None]
        norms = {}
        if want_norms or self.local_clip is not None:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if self.local_clip is not None:
                torch.nn.utils.clip_grads_with_norm_(params, self.local_clip, grad_norm)
            norms["grad_norm"] = grad_norm
        before = [p.detach().clone() for p in params] if want_norms else None
        set_lr(self.optimizer, lr)
        self._apply()
        if want_norms:
            norms["param_norm"] = torch.nn.utils.get_total_norm([p.detach() for p in params])
            norms["update_norm"] = torch.nn.utils.get_total_norm([p.detach() - b for p, b in zip(params, before)])
            norms = {k: float(v) for k, v in norms.items()}
        return norms

    def _apply(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        # Both engines step the same torch SGD with fp32 (or fp64) weights: one payload, so a checkpoint
        # resumes under either backend.
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class DDPEngine(EngineBase):
    """backend: ddp (and a plain single process): torch DistributedDataParallel when W > 1."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, world_size: int, device: torch.device,
                 precision: str, grad_clip_norm: float | None):
        self.module = model
        self.optimizer = optimizer
        self.world_size = world_size
        self.local_clip = grad_clip_norm
        if world_size > 1:
            # broadcast_buffers=False: DDP would otherwise overwrite every rank's BN running statistics
            # with rank 0's each forward; ghost_bn.update_running_stats keeps them identical instead.
            self.model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                             broadcast_buffers=False, gradient_as_bucket_view=True)
        else:
            self.model = model
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.device_type = device.type

    def micro_step(self, objective, batch, global_count: float, last: bool) -> torch.Tensor:
        """Forward and backward one micro-batch; return its detached stats vector."""
        sync = contextlib.nullcontext() if (last or self.model is self.module) else self.model.no_sync()
        with sync:
            with self.autocast():
                loss_sum, stats = objective(self.model, batch)
            (loss_sum * (self.world_size / global_count)).backward()
        return stats

    def _apply(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
