"""How gradients of the global-batch mean are computed and applied: plain (one process), DDP, or DeepSpeed.

The objective returns a SUM over its micro-batch. DDP averages gradients over the W ranks, so each
rank back-propagates W * sum / count_global: after the reduction the gradient is exactly the mean over
the B examples of the global batch (eq. 1), however B is split over ranks and micro-steps.
DDP skips the all-reduce (`no_sync`) on all but the last micro-step: one reduction per optimizer step.
`DeepSpeedEngine` (backend: deepspeed) has the same interface and arithmetic; see its docstring.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from harness.optim import set_lr
from models.ghost_bn import update_running_stats


class _EngineBase:
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


class Engine(_EngineBase):
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


# DeepSpeed config keys the harness derives from its own config (house style 1: one source of truth).
# A user JSON (deepspeed.config) may repeat them with the same value, or add any other key.
DERIVED_KEYS = {
    "train_batch_size": "batch.global_batch_size",
    "train_micro_batch_size_per_gpu": "the batch plan's micro-batch (batch.micro_batch_size)",
    "gradient_accumulation_steps": "the batch plan's accumulation steps",
    "gradient_clipping": "optim.grad_clip_norm",
    "torch_autocast": "precision",
}
# Keys that would change the science or the checkpoint format behind the harness's back.
OWNED_KEYS = {
    "optimizer": "the optimizer is torch SGD from optim.* (eps_eff -> lr in harness/optim.py)",
    "scheduler": "the learning rate follows schedule.* and is set before every step",
    "fp16": "precision is set by the harness key precision (fp32 | bf16)",
    "bf16": "precision: bf16 runs under DeepSpeed's torch_autocast with fp32 weights, like backend: ddp",
    "amp": "precision is set by the harness key precision (fp32 | bf16)",
}


def deepspeed_config(plan, precision: str, grad_clip_norm: float | None, user_config: str | None = None) -> dict:
    """The DeepSpeed config for a batch plan: batch sizes from the plan, clipping from optim.grad_clip_norm,
    bf16 autocast from precision; merged with the user's JSON, whose contradictions are ConfigErrors."""
    from harness.errors import ConfigError

    derived = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.accumulation_steps,
        # DeepSpeed clips at 1.0 unless told otherwise; the harness clips only when optim.grad_clip_norm is set.
        "gradient_clipping": float(grad_clip_norm or 0.0),
        # bf16 = fp32 weights and SGD state, bf16 compute (the DDP engine's definition). DeepSpeed's own `bf16`
        # section would keep bf16 weights plus an fp32 copy in a wrapper optimizer: another trajectory, and
        # checkpoints no longer interchangeable with backend: ddp (backend may change on resume).
        "torch_autocast": {"enabled": precision == "bf16", "dtype": "bfloat16"},
    }
    if user_config is None:
        return derived
    user = _read_json(user_config)
    for key, value in user.items():
        if key in OWNED_KEYS and not _is_off(value):
            raise ConfigError(f"deepspeed.config {user_config}: key {key!r} is not allowed ({OWNED_KEYS[key]}); remove it")
        if key in DERIVED_KEYS and value != derived[key]:
            raise ConfigError(f"deepspeed.config {user_config}: {key}={json.dumps(value)} contradicts the harness config "
                              f"({DERIVED_KEYS[key]} gives {json.dumps(derived[key])}); remove it from the JSON or change the harness config")
        if key == "zero_optimization" and isinstance(value, dict) and value.get("stage", 0) not in (0, None):
            raise ConfigError(f"deepspeed.config {user_config}: zero_optimization.stage={value['stage']} is not supported "
                              "(checkpoints hold the full optimizer state, written by rank 0); use stage 0 or remove it")
    return {**derived, **{k: v for k, v in user.items() if k not in OWNED_KEYS}}


def _is_off(value) -> bool:
    return value in (None, False, {}) or (isinstance(value, dict) and value.get("enabled") is False)


def _read_json(path: str) -> dict:
    from harness.errors import ConfigError

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config {path}: file not found; point deepspeed.config at a DeepSpeed JSON") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config {path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed.config {path}: expected a JSON object of DeepSpeed keys, got {type(data).__name__}")
    return data


class DeepSpeedEngine(_EngineBase):
    """backend: deepspeed. The same model, batch plan and torch SGD, stepped by `deepspeed.initialize`'s engine.

    DeepSpeed divides the loss by gradient_accumulation_steps (A) and averages gradients over the W ranks, so
    each micro-step hands it W * A / B times the micro-batch's loss sum: after DeepSpeed's scaling the
    gradient is again the mean over the B examples of the global batch (eq. 1). The accumulation boundary is
    set explicitly from the plan (`last`), not from DeepSpeed's own micro-step counter, so the gradient
    all-reduce happens exactly once per optimizer step, as with DDP.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, plan, device: torch.device,
                 precision: str, grad_clip_norm: float | None, user_config: str | None = None):
        import deepspeed

        from harness.distributed import ensure_process_group

        self.config = deepspeed_config(plan, precision, grad_clip_norm, user_config)
        # DeepSpeed insists on a process group and on LOCAL_RANK even at W = 1 (a plain `harness train`).
        ensure_process_group(device)
        os.environ.setdefault("LOCAL_RANK", "0")
        self.module = model
        self.optimizer = optimizer  # DeepSpeed steps this very object (no ZeRO, no wrapper): lr is set on it
        self.plan = plan
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        if self.ds.global_rank == 0:  # the config in effect, for the log (clipping 0.0 shows it is off)
            print(f"harness: deepspeed {deepspeed.__version__} engine, config {json.dumps(self.config)}", flush=True)
        # autocast() serves evaluation with the bare module; training forwards use DeepSpeed's torch_autocast.
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.device_type = device.type

    def micro_step(self, objective, batch, global_count: float, last: bool) -> torch.Tensor:
        self.ds.set_gradient_accumulation_boundary(last)
        loss_sum, stats = objective(self.ds, batch)
        self.ds.backward(loss_sum * (self.plan.world_size * self.plan.accumulation_steps / global_count))
        if not last:
            self.ds.step()  # off the boundary this only advances DeepSpeed's micro-step counter
        return stats

    def _apply(self) -> None:
        """DeepSpeed's step at the accumulation boundary: clipping at gradient_clipping, the SGD step, zeroing."""
        self.ds.step()


def build_engine(backend: str, model, optimizer, env, precision: str, grad_clip_norm: float | None,
                 plan=None, deepspeed_config_path: str | None = None) -> Engine | DeepSpeedEngine:
    if backend == "deepspeed":
        return DeepSpeedEngine(model, optimizer, plan, env.device, precision, grad_clip_norm, deepspeed_config_path)
    return Engine(model, optimizer, env.world_size, env.device, precision, grad_clip_norm)
