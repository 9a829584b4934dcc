"""Deep fully connected autoencoder on MNIST (Hinton & Salakhutdinov 2006; Sutskever et al. 2013; appendix B.2).

Widths 784-1000-500-250-30-250-500-1000-784: logistic units everywhere except the linear 30-unit code
layer, and logistic output units, so a reconstruction lies in [0, 1] like its input pixels. The decoder
mirrors `widths` (the encoder's hidden widths, code last): 2,837,314 parameters for MNIST.

Initialisation: the "sparse initialisation" Sutskever et al. use for these autoencoders (after Martens
2010): every unit receives `sparse_init` (15) non-zero incoming weights drawn from N(0, 1), on randomly
chosen inputs; biases 0. `sparse_init: 0` keeps torch's default nn.Linear initialisation instead.

The task is reconstruction (`ModelConfig.task`): inputs and targets are the images scaled to [0, 1];
the loss is the squared error summed over the 784 pixels, averaged over the batch's images (see
harness.train.objectives.Reconstruction). L2 1e-5 is `optim.weight_decay` in the configs.
Tiny variant for tests: widths [64, 16].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from harness.core.configlib import non_negative
from models.registry import ModelConfig, register


@dataclass
class AutoencoderConfig(ModelConfig):
    name: Literal["autoencoder"] = "autoencoder"
    # Encoder widths after the input, the last one being the linear code; the decoder mirrors them.
    widths: list[int] = field(default_factory=lambda: [1000, 500, 250, 30])
    # Non-zero incoming weights per unit at initialisation (Sutskever et al.'s sparse init); 0: torch default.
    sparse_init: int = non_negative(15)

    def validate(self, path: str) -> None:
        from harness.core.errors import ConfigError

        if not self.widths or any(w <= 0 for w in self.widths):
            raise ConfigError(f"config key {path}.widths: give one or more positive layer widths, got {self.widths}")

    def task(self, data_task: str) -> str:
        return "reconstruction" if data_task == "classification" else super().task(data_task)


def sparse_init_(linear: nn.Linear, connections: int, generator: torch.Generator | None = None) -> None:
    """Each output unit gets `connections` non-zero N(0, 1) weights from random inputs (Martens 2010)."""
    out_features, in_features = linear.weight.shape
    k = min(connections, in_features)
    with torch.no_grad():
        weight = torch.zeros(out_features, in_features)
        chosen = torch.rand(out_features, in_features, generator=generator).argsort(dim=1)[:, :k]
        weight.scatter_(1, chosen, torch.randn(out_features, k, generator=generator))
        linear.weight.copy_(weight)
        linear.bias.zero_()


class Autoencoder(nn.Module):
    def __init__(self, in_features: int, widths: list[int], sparse_connections: int):
        super().__init__()
        sizes = [in_features, *widths, *reversed(widths[:-1]), in_features]
        code = len(widths)  # the layer producing the code is linear
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            linear = nn.Linear(a, b)
            if sparse_connections:
                sparse_init_(linear, sparse_connections)
            layers.append(linear)
            if i != code:
                layers.append(nn.Sigmoid())
        self.net = nn.Sequential(nn.Flatten(), *layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images in [0, 1] -> (N, C*H*W) reconstructions in [0, 1]."""
        return self.net(x)


@register(AutoencoderConfig)
def build(cfg: AutoencoderConfig, spec) -> nn.Module:
    from harness.core.errors import ConfigError

    if len(spec.in_shape) != 3:
        raise ConfigError(f"config key model.name: autoencoder needs images (mnist); data {spec.kind!r} is "
                          f"{spec.task} data")
    return Autoencoder(math.prod(spec.in_shape), cfg.widths, cfg.sparse_init)
