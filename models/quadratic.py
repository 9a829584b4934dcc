"""The noisy quadratic model (Zhang et al. 2019): one weight vector w in R^d and a fixed diagonal Hessian H taken
from the data (`data.name: nqm`; data_pipelines/nqm.py says how the data make the gradient noise sigma^2 H).

The forward pass returns each example's loss, 1/2 w^T H w - w^T H x_i (the quadratic objective sums it): the
squared distance 1/2 (w - x_i)^T H (w - x_i) without its w-independent part, so the data's mean loss is exactly
1/2 w^T H w. Initialisation w0_j = init s_j / sqrt(h_j) with random signs s_j (from the run's seed): every
direction starts at loss init^2 / 2, and B_simple(w0) = B_noise(w0) = sigma^2 / init^2 (data_pipelines/nqm.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from harness.core.configlib import positive
from harness.core.errors import ConfigError
from models.registry import ModelConfig, register


@dataclass
class QuadraticConfig(ModelConfig):
    name: Literal["quadratic"] = "quadratic"
    # Initial distance from the optimum, per direction: loss init^2 / 2 in each of the d directions.
    init: float = positive(1.0)

    def task(self, data_task: str) -> str:
        if data_task != "quadratic":
            raise ConfigError(f"model quadratic trains on the noisy quadratic only (data.name: nqm, made by `harness "
                              f"data synth nqm DIR`), not on {data_task} data; pick another model.name")
        return data_task


class NoisyQuadratic(nn.Module):
    def __init__(self, curvature, init: float):
        super().__init__()
        h = torch.tensor(curvature, dtype=torch.float64)
        self.register_buffer("curvature", h)
        signs = torch.randint(0, 2, (len(h),), dtype=torch.float64) * 2 - 1  # after the trainer's manual_seed
        self.weight = nn.Parameter(init * signs / h.sqrt())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return 0.5 * ((w * w - 2 * w * x) * self.curvature).sum(1)


@register(QuadraticConfig)
def build(cfg: QuadraticConfig, spec) -> nn.Module:
    if not spec.curvature:
        raise ConfigError("model quadratic needs the noisy quadratic's data (data.name: nqm, `harness data synth nqm DIR`)")
    return NoisyQuadratic(spec.curvature, cfg.init)
