"""`data:` of a run config (beside the readers it configures) and the reader options it hands them."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, Optional

from harness.core.configlib import non_negative, positive
from harness.core.errors import ConfigError

DATASETS = ("digits", "cifar10", "cifar100", "mnist", "mnist1d", "ptb", "imagenet", "nqm")  # nqm: data_pipelines/nqm.py
IN_MEMORY = ("digits", "cifar10", "cifar100", "mnist", "mnist1d")  # data_pipelines/memory.py reads these


@dataclass
class DataConfig:
    name: Literal[DATASETS] = "digits"
    # Directory holding manifest.json and the shards (made by `harness data convert` or `harness data synth`).
    path: Optional[str] = None
    # The dataset's standard random augmentation (CIFAR: pad 4, crop, flip; digits: +-1 pixel shift).
    augment: bool = True
    eval_batch_size: int = positive(1000)
    # Streaming reader (ImageNet; see data_pipelines/stream.py). Loader worker processes per rank (0: in the
    # training process); the stream's order depends on it, like on the world size and micro-batch. Unset: the CPUs
    # this process may use shared over the node's ranks, less one for the training process (a CPU decodes about
    # 110 ImageNet JPEGs/s: one GPU at 2,500 img/s needs some 23 workers, or data.gpu_decode).
    workers: Optional[int] = non_negative(None)
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
    # Train on a fixed held-out split of the training set: its first N examples in a FIXED permutation that does
    # not depend on the run's seed (data_pipelines/memory.py: held_out_split); the other examples are not read.
    # Epochs count N examples. Unset: the whole training split. In-memory datasets only. Science: a run's id
    # changes with it. The paper's MNIST budget, 156,250 steps = 200 epochs at B = 64, implies N = 50,000.
    train_examples: Optional[int] = positive(None)

    def validate(self, path: str) -> None:
        if self.train_examples is not None and self.name not in IN_MEMORY:
            raise ConfigError(f"config key {path}.train_examples: only for the in-memory datasets "
                              f"({', '.join(IN_MEMORY)}), not {self.name}; remove it")
        if self.eval_resize < self.image_size:
            raise ConfigError(f"config key {path}.eval_resize ({self.eval_resize}) must be >= {path}.image_size "
                              f"({self.image_size}): evaluation resizes, then center-crops image_size")
        if self.path is None:
            raise ConfigError(
                f"config key {path}.path is not set; point it at a shard directory made by "
                f"`harness data convert {self.name} SRC DIR` (or `harness data synth cifar10 DIR` for tests)"
            )


@dataclass(frozen=True)
class ReaderOptions:
    """The reader settings of `data:` beyond name/path/augment/eval_batch_size (defaults: DataConfig)."""

    workers: Optional[int]
    shuffle_buffer: int
    resampled: bool
    image_size: int
    eval_resize: int
    gpu_decode: bool
    skip_bad_samples: bool
    train_examples: Optional[int] = None

    @classmethod
    def of(cls, data_config: DataConfig | None = None) -> "ReaderOptions":
        data_config = data_config or DataConfig(path="")
        return cls(**{f.name: getattr(data_config, f.name) for f in fields(cls)})


def train_examples_of(data: dict, num_train: int) -> int:
    """Training examples per epoch of a raw `data:` mapping whose training split has `num_train` examples
    (sweep cost estimates, `harness plan`): `train_examples` if set, checked against the split."""
    n = data.get("train_examples")
    if n is None:
        return num_train
    if not 1 <= n <= num_train:
        raise ConfigError(f"config key data.train_examples: {n} is not in 1 .. {num_train}, the training examples "
                          f"of {data.get('name')} at {data.get('path')}; give at most {num_train}")
    return n


def resolve_workers(workers: int | None) -> int:
    """data.workers, or the default: this process's CPUs (SLURM's affinity included) shared over the node's ranks
    (torchrun's LOCAL_WORLD_SIZE), less one for the training process; at least 1."""
    if workers is not None:
        return workers
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) - 1)
