"""The run configuration: one typed tree, loaded strictly from YAML plus `--set` overrides.

Defaults live in the config classes and nowhere else, so what a run did is what its resolved config.yaml says.
Each section's class lives beside the code it configures (`batch:` in recipe/batch_plan.py, `budget:` in
recipe/budget.py, `data:` in data_pipelines/config.py, `model:` in each models/<family>.py); the rest is here.
Learning rates are the paper's effective rates eps_eff = lr / (1 - m) (sec. 3.3), converted once by
harness/recipe/optim.py. Durations may be given in steps or epochs; harness/recipe/budget.py converts them once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import models
import yaml
from data_pipelines.config import DataConfig
from data_pipelines.spec import DataSpec
from harness.core import configlib
from harness.core.configlib import bounded, non_negative, positive
from harness.core.errors import ConfigError
from harness.core.keys import flatten, is_layout_key, run_id
from harness.recipe.batch_plan import BatchConfig, BatchPlan, plan_for
from harness.recipe.budget import BudgetConfig, Durations, examples_per_epoch, to_steps
from harness.train.distributed import DistributedConfig
from models.wide_resnet import WideResNetConfig


@dataclass
class OptimConfig:
    name: Literal["sgd", "momentum"] = "momentum"
    # Heavy-ball coefficient m (sec. 3.1); used when name is momentum.
    momentum: float = 0.9
    # The paper's effective learning rate eps_eff = lr / (1 - m); plain SGD: eps_eff = lr.
    effective_lr: float = positive(1.0)
    # L2 coefficient applied as weight decay (5e-4 for Wide-ResNets, 1e-5 for the autoencoder).
    weight_decay: float = non_negative(5e-4)
    # Clip the global gradient norm to this value (the LSTM uses 5); unset: no clipping.
    grad_clip_norm: Optional[float] = positive(None)

    def validate(self, path: str) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"config key {path}.momentum: must be in [0, 1), got {self.momentum}")


@dataclass
class ScheduleConfig:
    # gamma: divide the rate by this 10 times in the second half of training (appendix B.1).
    decay_factor: float = positive(2.0)
    # Final effective rate; if set, gamma = (effective_lr / final_lr) ** (1/10) (sec. 7.1).
    final_lr: Optional[float] = positive(None)
    # Linear warm-up steps (Goyal et al.); the paper uses none.
    warmup_steps: int = non_negative(0)


@dataclass
class DeepSpeedConfig:
    # backend: deepspeed only. A DeepSpeed JSON merged over the config the harness derives (batch sizes from the
    # batch plan, gradient_clipping from optim.grad_clip_norm, bf16 autocast from precision); it may add any
    # other DeepSpeed key; a key that contradicts the harness config is an error (harness/train/deepspeed.py).
    config: Optional[str] = None

    def validate(self, path: str) -> None:
        if self.config is not None and not Path(self.config).is_file():
            raise ConfigError(f"config key {path}.config: {self.config} is not a file; point it at a DeepSpeed JSON or set it to null")


@dataclass
class LogConfig:
    # Metrics (metrics.jsonl, TensorBoard, the progress bar) every so many steps. The device's values are read
    # back to the host only at these steps, so a GPU never waits for the host in between.
    every_steps: int = positive(10)
    tensorboard: bool = True
    # Progress on rank 0: a tqdm bar on a terminal; elsewhere (a SLURM .out file, a pipe) a plain line at each tenth
    # of the run (harness/train/trainer.py: ProgressLines). false: neither.
    progress: bool = True
    # The gradient noise scale B_simple (McCandlish et al. 2018), measured online from the gradients of two batch
    # sizes (harness/train/noise_scale.py): metrics `b_simple`, `noise_trace`, `noise_grad_sq`, result.json
    # `b_simple`. At world size 1 it needs two micro-steps: the batch is then split in two (a layout change only).
    noise_scale: bool = False
    # EMA decay of the noise-scale estimates (per step).
    noise_scale_decay: float = positive(0.99)

    def validate(self, path: str) -> None:
        if not self.noise_scale_decay < 1:
            raise ConfigError(f"config key {path}.noise_scale_decay: must be in (0, 1), got {self.noise_scale_decay}")


@dataclass
class EvalConfig:
    # Evaluate every so many steps or epochs (at most one); always at the end.
    every_steps: Optional[int] = positive(None)
    every_epochs: Optional[float] = positive(None)
    # At the end, also the loss over the whole training set in eval mode (no augmentation, BN running statistics,
    # no dropout): result.json `train_set_loss` (and `train_set_accuracy`), beside `train_loss`, the mean
    # train-mode minibatch loss over the final floor(S/20) steps.
    train_loss: bool = False

    def validate(self, path: str) -> None:
        if self.every_steps is not None and self.every_epochs is not None:
            raise ConfigError(f"config key {path}: set at most one of every_steps and every_epochs")


@dataclass
class CheckpointConfig:
    every_steps: Optional[int] = positive(None)
    every_epochs: Optional[float] = positive(None)
    every_minutes: Optional[float] = positive(30.0)
    keep: int = positive(2)

    def validate(self, path: str) -> None:
        if self.every_steps is not None and self.every_epochs is not None:
            raise ConfigError(f"config key {path}: set at most one of every_steps and every_epochs")


@dataclass
class DivergenceConfig:
    # Stop with status "diverged" when the training loss is non-finite or above this value (unset: non-finite only).
    max_loss: Optional[float] = positive(None)


@dataclass
class SpeedConfig:
    """How fast, never what: these keys change kernels and so round-off, not the arithmetic the run specifies
    (they are layout keys: they may change between segments and are not part of the run id)."""

    # torch.compile the model (inductor). The trajectory is the eager one to round-off: fused kernels reassociate
    # floating-point sums (fp32: about 1e-7 relative per step).
    compile: bool = False
    # Convolutions in channels_last memory format (unset: on CUDA for models with 2-D convolutions).
    channels_last: Optional[bool] = None
    # Deterministic algorithms (harness/train/numerics.py): bitwise reproducible resume on a GPU, at some cost.
    deterministic: bool = False
    # torch's fused SGD kernel (one kernel for every parameter) instead of its foreach implementation.
    fused_optimizer: bool = True


def _model_field():
    return field(
        default_factory=WideResNetConfig,
        metadata={configlib.VARIANTS: models.config_class, "variant_names": models.names},
    )


@dataclass
class Config:
    # 0 .. 2^32 - 1: numpy's generators take no negative seed, and the augmentation keys pack the seed into the
    # low 32 bits of a 64-bit word (data_pipelines/order.py example_keys), so larger seeds would collide.
    seed: int = bounded(0, ge=0, le=2**32 - 1, why="numpy seeds are non-negative; augmentation keys hold 32 bits")
    # fp32 is IEEE fp32 on every device; tf32: fp32 weights, TF32 matrix products and convolutions on CUDA;
    # bf16: fp32 weights and optimizer, bf16 autocast.
    precision: Literal["fp32", "fp64", "bf16", "tf32"] = "fp32"
    backend: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: models.ModelConfig = _model_field()
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self, path: str) -> None:
        if self.backend == "deepspeed" and self.precision == "fp64":
            raise ConfigError("config key precision: fp64 does not work with backend: deepspeed (DeepSpeed reduces "
                              "gradients in fp32/bf16 only); use precision: fp32 or bf16, or backend: ddp")


def from_dict(data: dict) -> Config:
    return configlib.load(Config, data)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or start empty), apply `--set` overrides, and load strictly."""
    data = configlib.read_yaml(path) if path is not None else {}
    return from_dict(configlib.apply_overrides(data, list(overrides)))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(configlib.to_dict(cfg), sort_keys=False)


def config_hash(cfg: Config) -> str:
    """The run id of a config (harness.core.keys.run_id: its science, without the layout keys): default run
    directories are named by it, so the same run resumes in the same directory at any layout."""
    return run_id(configlib.to_dict(cfg))


def replace(cfg: Config, **changes) -> Config:
    return dataclasses.replace(cfg, **changes)


def plan_of(cfg: Config, world_size: int) -> BatchPlan:
    """The run's batch plan at a world size."""
    return plan_for(cfg.batch, world_size, cfg.model.ghost_group_size())


def durations_of(cfg: Config, spec: DataSpec) -> Durations:
    """The run's budget and intervals in steps, for its data."""
    b = cfg.batch.global_batch_size
    per_epoch = examples_per_epoch(spec.task, spec.num_train, b, cfg.model.sequence_length())
    return to_steps(cfg.budget.steps, cfg.budget.epochs, per_epoch, b, cfg.eval.every_steps, cfg.eval.every_epochs,
                    cfg.checkpoint.every_steps, cfg.checkpoint.every_epochs)


def check_resumable(run_dir: Path, cfg: Config) -> None:
    """A run directory belongs to one experiment: refuse to continue it with a different science config."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return
    try:
        old = flatten(configlib.to_dict(from_dict(configlib.read_yaml(path))))
    except ConfigError as e:
        raise ConfigError(f"{path} cannot be read back ({e}); use a new --run-dir") from None
    new = flatten(configlib.to_dict(cfg))
    diff = [k for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not is_layout_key(k)]
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
        raise ConfigError(f"run dir {run_dir} holds a run with a different config ({shown}); "
                          "use a new --run-dir, or the original config to resume it")


def default_run_dir(config_path: str | Path, cfg: Config) -> Path:
    """runs/<config file stem>-<run id>: the same command (at any layout) always finds the same directory."""
    return Path("runs") / f"{Path(config_path).stem}-{config_hash(cfg)}"
