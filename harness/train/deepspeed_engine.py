"""backend: deepspeed: the DeepSpeed config the harness derives from its own config, and the engine that steps
the same model, batch plan and torch SGD through `deepspeed.initialize`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

from harness.core.errors import ConfigError
from harness.train.engine import EngineBase

# DeepSpeed config keys the harness derives from its own config: the harness config is the one source of truth,
# so a DeepSpeed JSON cannot silently train another batch size, clipping or precision than config.yaml says.
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
    "optimizer": "the optimizer is torch SGD from optim.* (eps_eff -> lr in harness/recipe/optim.py)",
    "scheduler": "the learning rate follows schedule.* and is set before every step",
    "fp16": "precision is set by the harness key precision (fp32 | bf16)",
    "bf16": "precision: bf16 runs under DeepSpeed's torch_autocast with fp32 weights, like backend: ddp",
    "amp": "precision is set by the harness key precision (fp32 | bf16)",
}


def deepspeed_config(plan, precision: str, grad_clip_norm: float | None, user_config: str | None = None) -> dict:
    """The DeepSpeed config for a batch plan: batch sizes from the plan, clipping from optim.grad_clip_norm,
    bf16 autocast from precision; merged with the user's JSON, whose contradictions are ConfigErrors."""
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
        # DeepSpeed's throughput timer synchronizes the device twice per micro-step (its `synchronized` default):
        # the harness measures throughput itself, at log intervals.
        "timers": {"throughput": {"enabled": False}},
        "wall_clock_breakdown": False,
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
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config {path}: file not found; point deepspeed.config at a DeepSpeed JSON") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config {path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:  # json nests one Python frame per level
        raise ConfigError(f"deepspeed.config {path}: nested too deeply to be a DeepSpeed config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed.config {path}: expected a JSON object of DeepSpeed keys, got {type(data).__name__}")
    return data


def uncached_op() -> Path | None:
    """The op DeepSpeed compiles on its first use here, when it is not built yet: on the CPU accelerator its
    shared-memory collectives (deepspeed/comm/torch.py: build_shm_op, a JIT torch extension, about 85 s), looked
    up where torch's JIT builds extensions (torch/utils/cpp_extension.py: _get_build_directory)."""
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import get_default_build_root

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:  # a GPU accelerator: NCCL, nothing to build
        return None
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        root = Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
    so = Path(root) / builder.NAME / f"{builder.NAME}.so"
    return None if so.is_file() else so


def announce_op_build(is_main: bool) -> None:
    so = uncached_op()
    if so is not None and is_main:
        print(f"harness: deepspeed: building its {so.stem} op once (about 1.5 minutes; cached in {so.parent.parent}, "
              "set TORCH_EXTENSIONS_DIR to share the cache)", flush=True)


class DeepSpeedEngine(EngineBase):
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

        from harness.train.distributed import ensure_process_group

        self.config = deepspeed_config(plan, precision, grad_clip_norm, user_config)
        # DeepSpeed insists on a process group and on LOCAL_RANK even at W = 1 (a plain `harness train`).
        ensure_process_group(device)
        os.environ.setdefault("LOCAL_RANK", "0")
        self.module = model
        self.optimizer = optimizer  # DeepSpeed steps this very object (no ZeRO, no wrapper): lr is set on it
        self.plan = plan
        self.device = device
        announce_op_build(torch.distributed.get_rank() == 0)  # before initialize(), which builds it
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        if self.ds.global_rank == 0:  # the config in effect, for the log (clipping 0.0 shows it is off)
            print(f"harness: deepspeed {deepspeed.__version__} engine, config {json.dumps(self.config)}", flush=True)
        # autocast() serves evaluation with the bare module; training forwards use DeepSpeed's torch_autocast.
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.device_type = device.type

    def micro_step(self, objective, batch, global_count: float, accum_index: int) -> torch.Tensor:
        last = accum_index == self.plan.accumulation_steps - 1
        self.ds.set_gradient_accumulation_boundary(last)
        loss_sum, stats = objective(self.ds, batch)
        self.ds.backward(loss_sum * (self.plan.world_size * self.plan.accumulation_steps / global_count))
        self._after_backward(accum_index)
        if not last:
            self.ds.step()  # off the boundary this only advances DeepSpeed's micro-step counter
        return stats

    def compile(self) -> None:
        """speed.compile: DeepSpeed's own torch.compile of the wrapped module."""
        self.ds.compile()

    def _apply(self) -> None:
        """DeepSpeed's step at the accumulation boundary: clipping at gradient_clipping, the SGD step, zeroing."""
        self.ds.step()


