"""Pre-activation Wide-ResNet d-k (Zagoruyko & Komodakis 2016) with ghost batch norm.

depth d = 6n + 4 (n blocks per stage), widths 16, 16k, 32k, 64k. The 1x1 projection shortcut takes the
pre-activated input, as in the authors' code. WRN-16-4 for 10 classes has 2,748,890 parameters.
Variants: 16-4 (CIFAR-10, the paper's main model), 28-10 (CIFAR-100), 10-1 (tests and demos).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.configlib import positive
from models import ModelConfig, register
from models.ghost_bn import GhostBatchNorm2d


@dataclass
class WideResNetConfig(ModelConfig):
    name: Literal["wrn"] = "wrn"
    depth: int = positive(16)
    width: int = positive(4)
    # Examples per batch-norm group, fixed whatever the batch size or layout (the paper uses 64).
    ghost_batch_size: int = positive(64)

    def validate(self, path: str) -> None:
        from harness.errors import ConfigError

        if (self.depth - 4) % 6:
            raise ConfigError(f"config key {path}.depth: a Wide-ResNet has depth 6n+4 (10, 16, 22, 28, ...), got {self.depth}")

    def ghost_group_size(self) -> int:
        return self.ghost_batch_size


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm):
        super().__init__()
        self.bn1 = norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if (cin != cout or stride != 1) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, width: int, num_classes: int, in_channels: int, norm):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for stage, cout in enumerate(widths[1:]):
            for i in range(n):
                blocks.append(Block(cin, cout, 2 if (stage > 0 and i == 0) else 1, norm))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = norm(cin)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv(x))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register(WideResNetConfig)
def build(cfg: WideResNetConfig, spec) -> nn.Module:
    return WideResNet(
        cfg.depth, cfg.width, spec.num_classes, spec.in_shape[0],
        norm=lambda c: GhostBatchNorm2d(c, cfg.ghost_batch_size),
    )
