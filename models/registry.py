"""The model-family registry: each family registers its config dataclass (its own keys, validated strictly) and
a builder `build(cfg, spec) -> nn.Module`, where `spec` describes the data (see `data_pipelines.spec.DataSpec`).
`import models` imports every family, which fills the registry."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch.nn as nn

_REGISTRY: dict[str, tuple[type, Callable]] = {}


@dataclasses.dataclass
class ModelConfig:
    name: str

    def ghost_group_size(self) -> int | None:
        """Examples per ghost-BN group, or None if the model has no batch norm."""
        return None

    def task(self, data_task: str) -> str:
        """The objective this model trains for on data of `data_task` (the autoencoder: reconstruction)."""
        if data_task == "quadratic":
            from harness.core.errors import ConfigError

            raise ConfigError(f"data nqm (the noisy quadratic) trains model.name: quadratic, not {self.name}")
        return data_task

    def sequence_length(self) -> int | None:
        """Tokens per stream per step for a language model (the LSTM's unroll), else None."""
        return None

    def exclude_norm_from_decay(self) -> bool:
        """True: no weight decay on normalization parameters (harness.recipe.optim.param_groups)."""
        return False


def register(config_cls: type):
    """Decorator for a builder: `@register(WideResNetConfig) def build(cfg, spec): ...`."""

    def wrap(builder: Callable) -> Callable:
        _REGISTRY[config_cls().name] = (config_cls, builder)
        return builder

    return wrap


def config_class(name: str) -> type | None:
    entry = _REGISTRY.get(name)
    return entry[0] if entry else None


def names() -> list[str]:
    return sorted(_REGISTRY)


def build_model(cfg: ModelConfig, spec) -> nn.Module:
    return _REGISTRY[cfg.name][1](cfg, spec)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
