"""ResNet for ImageNet as trained by Goyal et al. 2017 ("Accurate, large minibatch SGD"), with ghost batch norm.

torchvision's ResNet and its BasicBlock/Bottleneck, reused as they are, with two changes:
- every BatchNorm2d is a GhostBatchNorm2d over fixed groups of `ghost_batch_size` examples: 64 by default, the
  paper's ghost batch size in all its batch-norm experiments (secs. 3.2 and 4: "we use ghost batch normalization
  in all experiments that include batch normalization layers", "we set the ghost batch size to 64"). 32 is
  Goyal et al.'s own grouping (BN statistics over each GPU's 32 examples, their sec. 5.1), kept as an option:
  `ghost_batch_size: 32` at any layout;
- `width` scales the stem and the four stages (w, 2w, 4w, 8w; bottleneck expansion 4), so that a tiny
  variant exists for tests; width 64 is exactly torchvision's layout (resnet50: 25,557,032 parameters).
Initialisation as Goyal et al. describe it: He (fan-out) convolutions as torchvision, BN gamma 1 / beta 0,
the last BN gamma of each residual block 0 when `zero_init_residual` (every block starts as the identity),
and the final 1000-way linear layer drawn from N(0, 0.01^2), zero bias (torchvision keeps nn.Linear's default).
`no_bn_decay` (default true): no weight decay on the BN parameters, as Goyal et al. sec. 5.1 ("we do not apply
weight decay on the learnable BN coefficients (namely, gamma and beta)"): harness.recipe.optim.param_groups
exempts exactly the normalization layers' parameters; the classifier's bias keeps its weight decay, as in their
recipe. The key was called `no_bn_bias_decay` before; an old config gets a one-line error naming `no_bn_decay`.

Tiny variant for tests: depth 18, width 8 (BasicBlocks; 32x32 images work: the stages end at 1x1).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

from harness.core.configlib import positive
from models.ghost_bn import GhostBatchNorm2d
from models.registry import ModelConfig, register
from models.wide_resnet import check_image_classes

# depth -> (torchvision block class, blocks per stage), He et al. 2016 table 1 (resnet18 ... resnet152).
DEPTHS = {
    18: ("BasicBlock", [2, 2, 2, 2]),
    34: ("BasicBlock", [3, 4, 6, 3]),
    50: ("Bottleneck", [3, 4, 6, 3]),
    101: ("Bottleneck", [3, 4, 23, 3]),
    152: ("Bottleneck", [3, 8, 36, 3]),
}


@dataclass
class ResNetConfig(ModelConfig):
    name: Literal["resnet"] = "resnet"
    depth: int = 50
    # Channels of the stem and the first stage (torchvision: 64).
    width: int = positive(64)
    # Examples per batch-norm group: 64, the paper's in every BN experiment (secs. 3.2, 4); 32 is Goyal et al.'s
    # per-GPU grouping.
    ghost_batch_size: int = positive(64)
    # Initialise the last BN gamma of every residual block to 0 (Goyal et al.).
    zero_init_residual: bool = True
    # No weight decay on BN gamma and beta (Goyal et al. sec. 5.1; also exempts the classifier bias, see above).
    no_bn_decay: bool = True

    def validate(self, path: str) -> None:
        from harness.core.errors import ConfigError

        if self.depth not in DEPTHS:
            raise ConfigError(f"config key {path}.depth: one of {', '.join(map(str, DEPTHS))}, got {self.depth}")

    def ghost_group_size(self) -> int:
        return self.ghost_batch_size

    def exclude_norm_from_decay(self) -> bool:
        return self.no_bn_decay


@functools.cache
def _torchvision_resnet():
    """torchvision's resnet module and our subclass, made on first use: importing torchvision loads all of its
    models and datasets (seconds), which no other model needs."""
    from torchvision.models import resnet as tv

    class ResNet(tv.ResNet):
        """torchvision's ResNet with a variable base width and input channels (its forward is used as is)."""

        def __init__(self, block, layers: list[int], width: int, num_classes: int, in_channels: int, norm_layer,
                     zero_init_residual: bool):
            nn.Module.__init__(self)  # torchvision's __init__ hard-codes width 64 and 3 input channels
            self._norm_layer = norm_layer
            self.inplanes, self.dilation, self.groups, self.base_width = width, 1, 1, 64
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = norm_layer(width)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.layer1 = self._make_layer(block, width, layers[0])
            self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
            self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
            self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(8 * width * block.expansion, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.normal_(self.fc.weight, std=0.01)
            nn.init.zeros_(self.fc.bias)
            if zero_init_residual:
                for m in self.modules():
                    if isinstance(m, tv.Bottleneck):
                        nn.init.zeros_(m.bn3.weight)
                    elif isinstance(m, tv.BasicBlock):
                        nn.init.zeros_(m.bn2.weight)

    return tv, ResNet


@register(ResNetConfig)
def build(cfg: ResNetConfig, spec) -> nn.Module:
    check_image_classes("resnet", spec)
    tv, resnet_class = _torchvision_resnet()
    block, layers = DEPTHS[cfg.depth]
    return resnet_class(getattr(tv, block), layers, cfg.width, spec.num_classes, spec.in_shape[0],
                        lambda c: GhostBatchNorm2d(c, cfg.ghost_batch_size), cfg.zero_init_residual)
