"""What a run of a sweep costs before it runs: its optimizer steps and epochs from its budget and the data's size
(the manifest if the shards are there, else the standard dataset's), from the raw config dict alone."""

from __future__ import annotations

import functools
from typing import Optional

from harness.core import configlib
from harness.core.errors import ConfigError
from harness.recipe.budget import examples_per_epoch, to_steps


@functools.lru_cache(maxsize=64)
def _describe_data(name: str, path: Optional[str]):
    from data_pipelines import describe

    return describe(name, path)


def run_steps(config: dict) -> tuple[int, float]:
    """(optimizer steps, epochs) of a run, from its budget and the dataset's size (manifest or standard)."""
    spec, _ = _describe_data(config["data"]["name"], config["data"]["path"])
    b = config["batch"]["global_batch_size"]
    from data_pipelines.config import train_examples_of

    num_train = train_examples_of(config["data"], spec.num_train)  # data.train_examples: a held-out split
    n = examples_per_epoch(spec.task, num_train, b, _sequence_length(config["model"]))
    steps = to_steps(config["budget"]["steps"], config["budget"]["epochs"], n, b)
    return steps.total_steps, steps.epochs


def _sequence_length(model: dict) -> Optional[int]:
    """The model's tokens per stream per step (language models; PTB epochs depend on it), from its config
    class when this build has it, else the raw `unroll` key."""
    import models

    cls = models.config_class(model.get("name"))
    if cls is None:
        return model.get("unroll")
    try:
        return configlib.load(cls, model).sequence_length()
    except ConfigError:
        return model.get("unroll")


def data_source(config: dict) -> str:
    return _describe_data(config["data"]["name"], config["data"]["path"])[1]
