"""Datasets as webdataset shards, and the readers that feed the trainer.

`build_data` returns a source with:
  spec                        what the model needs to know (task, classes, input shape, sizes)
  train_micro_batches(step)   this rank's A micro-batches of global batch `step`, as (inputs, targets)
  eval_batches()              this rank's share of the test split, each example exactly once over ranks
Sources: memory.InMemoryImages (digits, CIFAR, MNIST: identical global batches at every layout) and
stream.StreamingImages (ImageNet: equal batch counts per rank, no repeats per epoch; see their docstrings).
Neither needs state in a checkpoint: the data position is a function of the step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class DataSpec:
    kind: str  # digits, cifar10, ...
    task: str  # classification | language_model | reconstruction
    num_train: int
    num_test: int
    num_classes: int = 0
    in_shape: tuple[int, ...] = ()  # (C, H, W) for images
    vocab_size: int = 0


@dataclass(frozen=True)
class ReaderOptions:
    """The reader settings of `data:` beyond name/path/augment/eval_batch_size (defaults: harness.config.DataConfig)."""

    workers: int
    shuffle_buffer: int
    resampled: bool
    image_size: int
    eval_resize: int
    gpu_decode: bool
    skip_bad_samples: bool

    @classmethod
    def of(cls, data_config=None) -> "ReaderOptions":
        if data_config is None:
            from harness.config import DataConfig

            data_config = DataConfig()
        return cls(**{f.name: getattr(data_config, f.name) for f in fields(cls)})


STREAMING = ("imagenet",)  # too large for memory: streamed from the shards by data_pipelines/stream.py


def build_data(name, path, augment, eval_batch_size, plan, seed, rank, device, dtype,
               options: ReaderOptions | None = None, task_of=None, unroll=None):
    """The reader for the data and the task the model trains for: `task_of(manifest task) -> task`
    (ModelConfig.task; the autoencoder turns labelled images into "reconstruction"), `unroll` = tokens per
    stream per step (ModelConfig.sequence_length) for token streams."""
    from data_pipelines.shards import read_manifest

    manifest = read_manifest(path, name)
    options = options or ReaderOptions.of()
    task = task_of(manifest["task"]) if task_of is not None else manifest["task"]
    if task == "language_model":
        from data_pipelines.text import TokenStreams
        from harness.errors import ConfigError

        if unroll is None:
            raise ConfigError(f"data {name!r} is token streams: use a language model (model.name: lstm)")
        return TokenStreams(path, manifest, plan, seed, rank, device, unroll, eval_batch_size)
    if name in STREAMING:
        from data_pipelines.stream import StreamingImages

        return StreamingImages(path, manifest, plan, seed, rank, device, dtype, augment, eval_batch_size, options)
    from data_pipelines.memory import InMemoryImages

    return InMemoryImages(path, manifest, plan, seed, rank, device, dtype, augment, eval_batch_size,
                          options.skip_bad_samples, task)


def examples_per_epoch(spec: DataSpec, global_batch_size: int, unroll: int | None = None) -> int:
    """Examples one epoch holds, for harness.plan.to_steps (which divides it by B). A language model's
    example is one stream's `unroll` tokens: B streams x Zaremba's (N // B - 1) // unroll steps."""
    if spec.task == "language_model" and unroll is not None:
        from data_pipelines.text import steps_per_epoch

        return global_batch_size * steps_per_epoch(spec.num_train, global_batch_size, unroll)
    return spec.num_train


# The standard datasets' shapes, for `harness plan` when the shards are not at hand.
KNOWN = {
    "digits": DataSpec("digits", "classification", 1347, 450, 10, (1, 8, 8)),
    "cifar10": DataSpec("cifar10", "classification", 50000, 10000, 10, (3, 32, 32)),
    "cifar100": DataSpec("cifar100", "classification", 50000, 10000, 100, (3, 32, 32)),
    "mnist": DataSpec("mnist", "classification", 60000, 10000, 10, (1, 28, 28)),
    "imagenet": DataSpec("imagenet", "classification", 1281167, 50000, 1000, (3, 224, 224)),
    # Zaremba's PTB with <eos> per line: sizes in tokens.
    "ptb": DataSpec("ptb", "language_model", 929589, 82430, vocab_size=10000),
}


def spec_from_manifest(manifest: dict) -> DataSpec:
    splits = manifest["splits"]
    # Streamed JPEGs have no fixed shape: the reader crops data.image_size (the standard 224 shown here).
    shape = manifest.get("image_shape") or (KNOWN[manifest["kind"]].in_shape if manifest.get("kind") in STREAMING else ())
    return DataSpec(
        kind=manifest["kind"], task=manifest["task"], num_train=splits["train"]["size"],
        num_test=splits.get(manifest.get("eval_split", "test"), {}).get("size", 0),
        num_classes=len(manifest.get("classes", [])),
        in_shape=tuple(shape),
        vocab_size=manifest.get("vocab_size", 0),
    )


def describe(name: str, path: str | None) -> tuple[DataSpec, str]:
    """The data spec from the shards' manifest if readable, else the standard dataset's; and which it was."""
    from data_pipelines.shards import read_manifest
    from harness.errors import DataError

    try:
        return spec_from_manifest(read_manifest(path, name)), f"manifest {path}"
    except DataError:
        if name not in KNOWN:
            raise
        return KNOWN[name], f"standard {name} sizes; shards not found at {path}"
