"""The run configuration: one typed tree, loaded strictly from YAML plus `--set` overrides.

Defaults live here and nowhere else (house style 1). Learning rates are the paper's effective rates
eps_eff = lr / (1 - m) (sec. 3.3); `harness.optim` converts them once. Durations may be given in steps
or epochs; `harness.plan.to_steps` converts them once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

import models
from harness import configlib
from harness.configlib import non_negative, positive
from harness.errors import ConfigError
from models.wide_resnet import WideResNetConfig

DATASETS = ("digits", "cifar10", "cifar100", "mnist", "ptb", "imagenet")


@dataclass
class DataConfig:
    name: Literal[DATASETS] = "digits"
    # Directory holding manifest.json and the shards (made by `harness data convert` or `harness data synth`).
    path: Optional[str] = None
    # The dataset's standard random augmentation (CIFAR: pad 4, crop, flip; digits: +-1 pixel shift).
    augment: bool = True
    eval_batch_size: int = positive(1000)
    # Streaming reader (ImageNet; see data_pipelines/stream.py). Loader worker processes per rank (0: in the
    # training process); the stream's order depends on it, like on the world size and micro-batch.
    workers: int = non_negative(4)
    # Samples each worker shuffles among (raw JPEG bytes, ~110 kB each on ImageNet).
    shuffle_buffer: int = positive(2000)
    # true: each worker draws whole shards with replacement (webdataset's `resampled`); false: each epoch is a
    # permutation of the shards cut into equal parts, so no example repeats within an epoch.
    resampled: bool = True
    # Train crop (RandomResizedCrop) and evaluation resize -> center crop, in pixels (Goyal et al.: 224, 256).
    image_size: int = positive(224)
    eval_resize: int = positive(256)
    # Decode JPEGs on the GPU (torchvision.io.decode_jpeg, nvjpeg) instead of in the loader workers.
    gpu_decode: bool = False
    # Leave out unreadable samples and labels out of range (counted and logged) instead of stopping with an error.
    skip_bad_samples: bool = False

    def validate(self, path: str) -> None:
        if self.eval_resize < self.image_size:
            raise ConfigError(f"config key {path}.eval_resize ({self.eval_resize}) must be >= {path}.image_size "
                              f"({self.image_size}): evaluation resizes, then center-crops image_size")
        if self.path is None:
            raise ConfigError(
                f"config key {path}.path is not set; point it at a shard directory made by "
                f"`harness data convert {self.name} SRC DIR` (or `harness data synth cifar10 DIR` for tests)"
            )


@dataclass
class BatchConfig:
    # The one batch knob (house style 2): B, the number of examples per optimizer step.
    global_batch_size: int = positive(128)
    # Examples per rank per forward pass. Unset: the largest that fits max_micro_batch_size.
    micro_batch_size: Optional[int] = positive(None)
    max_micro_batch_size: int = positive(256)


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
class BudgetConfig:
    # Exactly one: optimizer steps (constant step budget) or epochs (constant epoch budget).
    steps: Optional[int] = positive(None)
    epochs: Optional[float] = positive(None)

    def validate(self, path: str) -> None:
        if (self.steps is None) == (self.epochs is None):
            got = "both" if self.steps is not None else "neither"
            raise ConfigError(
                f"config key {path}: set exactly one of {path}.steps or {path}.epochs (got {got}); "
                f"to switch, clear the other, e.g. --set {path}.epochs=null {path}.steps=1000"
            )


@dataclass
class DeepSpeedConfig:
    # backend: deepspeed only. A DeepSpeed JSON merged over the config the harness derives (batch sizes from the
    # batch plan, gradient_clipping from optim.grad_clip_norm, bf16 autocast from precision); it may add any
    # other DeepSpeed key; a key that contradicts the harness config is an error (harness/engine.py).
    config: Optional[str] = None

    def validate(self, path: str) -> None:
        if self.config is not None and not Path(self.config).is_file():
            raise ConfigError(f"config key {path}.config: {self.config} is not a file; point it at a DeepSpeed JSON or set it to null")


@dataclass
class LogConfig:
    every_steps: int = positive(10)
    tensorboard: bool = True
    # tqdm progress bar on rank 0 (off by default when stderr is not a terminal is NOT assumed: set false).
    progress: bool = True


@dataclass
class EvalConfig:
    # Evaluate every so many steps or epochs (at most one); always at the end.
    every_steps: Optional[int] = positive(None)
    every_epochs: Optional[float] = positive(None)

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


def _model_field():
    return field(
        default_factory=WideResNetConfig,
        metadata={configlib.VARIANTS: models.config_class, "variant_names": models.names},
    )


@dataclass
class Config:
    seed: int = 0
    precision: Literal["fp32", "fp64", "bf16"] = "fp32"
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
    """A short stable id of the resolved config (run directory names, sweep run ids)."""
    text = json.dumps(configlib.to_dict(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def replace(cfg: Config, **changes) -> Config:
    return dataclasses.replace(cfg, **changes)


# Keys that may differ when a run directory is resumed: they change the layout, the logging or where
# files are, never the trajectory (promise 1).
LAYOUT_KEYS = ("batch.micro_batch_size", "batch.max_micro_batch_size", "device", "backend", "deepspeed.", "data.path",
               "data.eval_batch_size", "data.workers", "data.gpu_decode", "log.", "checkpoint.", "eval.")


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config mapping as {dotted.key: value}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def is_layout_key(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in LAYOUT_KEYS)


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
