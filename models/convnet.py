"""A small 1-D convolutional classifier with ghost batch norm: the ghost-BN demo's model (MNIST-1D, Greydanus 2020).

Every layer is conv -> ghost batch norm -> ReLU: a Conv1d of `kernels[i]` taps (padding k // 2, no bias: the
norm's beta is the bias), stride 1 in the first layer and 2 in the others, then GhostBatchNorm over fixed groups
of `ghost_batch_size` examples (the paper's sec. 3.2: statistics independent of B and of the layout), then the
flattened features feed one linear classifier. The shape follows Greydanus' MNIST-1D CNN (three convolutions,
a flattened head), with batch norm added.

Input: signals as the reader gives them, (N, C, 1, L) (a 1-D signal is an image of one row), viewed as (N, C, L).
Default (channels [32, 32, 32], kernels [5, 3, 3]) on MNIST-1D (1 x 40, 10 classes): lengths 40 -> 40 -> 20 -> 10,
9,706 parameters (convolutions 160 + 3,072 + 3,072, ghost BN 3 x 64, classifier 320 x 10 + 10).

A plain nn.Module of standard layers and GhostBatchNorm, with no in-place operations, so that torch.func.vmap can
batch many runs of it (packed runs: harness/train/packed.py; tests/test_packed.py checks packed = separate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from harness.core.configlib import positive
from models.ghost_bn import GhostBatchNorm1d
from models.registry import ModelConfig, register


@dataclass
class ConvNetConfig(ModelConfig):
    name: Literal["convnet"] = "convnet"
    # Output channels of each convolution, first layer first.
    channels: list[int] = field(default_factory=lambda: [32, 32, 32])
    # Taps of each convolution (odd: padding k // 2 keeps the length at stride 1); one per entry of channels.
    kernels: list[int] = field(default_factory=lambda: [5, 3, 3])
    # Examples per batch-norm group, fixed whatever the batch size or layout (the paper uses 64, sec. 4).
    ghost_batch_size: int = positive(64)

    def validate(self, path: str) -> None:
        from harness.core.errors import ConfigError

        if not self.channels or any(c <= 0 for c in self.channels):
            raise ConfigError(f"config key {path}.channels: give one or more positive channel counts, got {self.channels}")
        if len(self.kernels) != len(self.channels):
            raise ConfigError(f"config key {path}.kernels: one kernel size per layer of {path}.channels "
                              f"({len(self.channels)}), got {len(self.kernels)}: {self.kernels}")
        if any(k <= 0 or k % 2 == 0 for k in self.kernels):
            raise ConfigError(f"config key {path}.kernels: odd positive sizes (padding k // 2 keeps the length), "
                              f"got {self.kernels}")

    def ghost_group_size(self) -> int:
        return self.ghost_batch_size


def output_length(length: int, kernels: list[int]) -> int:
    """The signal length after the convolutions (stride 1, then 2; padding k // 2)."""
    for i, k in enumerate(kernels):
        stride = 1 if i == 0 else 2
        length = (length + 2 * (k // 2) - k) // stride + 1
    return length


class ConvNet1d(nn.Module):
    def __init__(self, in_channels: int, length: int, num_classes: int, channels: list[int], kernels: list[int],
                 ghost_batch_size: int):
        super().__init__()
        layers, cin = [], in_channels
        for i, (c, k) in enumerate(zip(channels, kernels)):
            layers += [nn.Conv1d(cin, c, k, stride=1 if i == 0 else 2, padding=k // 2, bias=False),
                       GhostBatchNorm1d(c, ghost_batch_size), nn.ReLU()]
            cin = c
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin * output_length(length, kernels), num_classes)  # PyTorch's default inits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1, 2)  # (N, C, 1, L) -> (N, C, L): a view, no copy
        return self.fc(torch.flatten(self.features(x), 1))


@register(ConvNetConfig)
def build(cfg: ConvNetConfig, spec) -> nn.Module:
    from harness.core.errors import ConfigError

    if len(spec.in_shape) != 3 or spec.in_shape[1] != 1 or spec.num_classes < 1:
        raise ConfigError(f"config key model.name: convnet needs labelled 1-D signals, (C, 1, L) (mnist1d); data "
                          f"{spec.kind!r} is {spec.task} data of shape {spec.in_shape}")
    c, _, length = spec.in_shape
    if output_length(length, cfg.kernels) < 1:
        raise ConfigError(f"config key model.channels: {len(cfg.channels)} layers (each after the first halves the "
                          f"length) leave nothing of signals of length {length}; use fewer layers")
    return ConvNet1d(c, length, spec.num_classes, cfg.channels, cfg.kernels, cfg.ghost_batch_size)
