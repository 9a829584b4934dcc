"""Datasets as webdataset shards, and the readers that feed the trainer.

`build_data` returns a source with:
  spec                        what the model needs to know (task, classes, input shape, sizes)
  train_micro_batches(step)   this rank's A micro-batches of global batch `step`, as (inputs, targets)
  eval_batches()              this rank's share of the test split, each example exactly once over ranks
Sources: memory.InMemoryImages (digits, CIFAR, MNIST, MNIST-1D: identical global batches at every layout),
text.TokenStreams (PTB), nqm.NoisyQuadratic (the noisy quadratic model) and stream.StreamingImages (ImageNet: equal batch counts per rank, no repeats per epoch;
see their docstrings). None needs state in a checkpoint: the data position is a function of the step.
"""

from __future__ import annotations

from data_pipelines.config import DATASETS, DataConfig, ReaderOptions  # noqa: F401
from data_pipelines.spec import KNOWN, STREAMING, DataSpec, spec_from_manifest  # noqa: F401


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
        from harness.core.errors import ConfigError

        if unroll is None:
            raise ConfigError(f"data {name!r} is token streams: use a language model (model.name: lstm)")
        return TokenStreams(path, manifest, plan, seed, rank, device, unroll, eval_batch_size)
    if task == "quadratic":
        from data_pipelines.nqm import NoisyQuadratic

        return NoisyQuadratic(path, manifest, plan, seed, rank, device, dtype, eval_batch_size)
    if name in STREAMING:
        from data_pipelines.stream import StreamingImages

        return StreamingImages(path, manifest, plan, seed, rank, device, dtype, augment, eval_batch_size, options)
    from data_pipelines.memory import InMemoryImages

    return InMemoryImages(path, manifest, plan, seed, rank, device, dtype, augment, eval_batch_size,
                          options.skip_bad_samples, task, options.train_examples)


def describe(name: str, path: str | None) -> tuple[DataSpec, str]:
    """The data spec from the shards' manifest if readable, else the standard dataset's; and which it was."""
    from data_pipelines.shards import read_manifest
    from harness.core.errors import DataError

    try:
        return spec_from_manifest(read_manifest(path, name)), f"manifest {path}"
    except DataError as e:  # say why the shards were not read: missing, or another dataset's
        if name not in KNOWN:
            raise
        return KNOWN[name], f"standard {name} sizes; {e}"
