"""A fully connected classifier on flattened images (the demo's model on 8x8 digits)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch.nn as nn

from models.registry import ModelConfig, register


@dataclass
class MLPConfig(ModelConfig):
    name: Literal["mlp"] = "mlp"
    hidden: list[int] = field(default_factory=lambda: [256, 256])

    def validate(self, path: str) -> None:
        from harness.core.errors import ConfigError

        if not self.hidden or any(h <= 0 for h in self.hidden):
            raise ConfigError(f"config key {path}.hidden: give one or more positive layer widths, got {self.hidden}")


@register(MLPConfig)
def build(cfg: MLPConfig, spec) -> nn.Module:
    layers, width = [nn.Flatten()], math.prod(spec.in_shape)
    for h in cfg.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, spec.num_classes))
    return nn.Sequential(*layers)
