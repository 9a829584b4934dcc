"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training", appendix A), measured online, almost for free, from two batch sizes every step.

Sigma is the per-example gradient covariance and G the true gradient. A mean gradient over b examples has
E|G_b|^2 = |G|^2 + tr(Sigma) / b, so two measured squared norms at batch sizes b < B give unbiased estimates

    |G|^2     ~ (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

Each is noisy; both are smoothed by an exponential moving average and B_simple is the ratio of the smoothed
numerator and denominator (a ratio of averages, not an average of ratios, which the noise would bias).

Where the two batch sizes come from (harness/train/engine.py):
- B: the optimizer step's gradient, the mean over the global batch, after every reduction.
- b: a gradient before any reduction. With accumulation (A >= 2) it is each rank's FIRST micro-step (b = m, the
  micro-batch; DDP and DeepSpeed reduce only on the last micro-step), averaged over the W ranks. Without
  accumulation on several ranks (A = 1, W >= 2, backend ddp) it is each rank's local gradient, read in the DDP
  communication hook before the all-reduce (b = B / W). At world size 1 without accumulation there is no
  smaller batch: the trainer then splits the batch into two micro-steps (the micro-batch is a layout key, so
  the trajectory does not change), or, when ghost-BN groups forbid that, says so and measures nothing.
Biases: with ghost-BN groups that span ranks (m < G) the examples of a group are normalized together, so a
rank's share is not an independent sample of b examples; the estimate is then biased (the README says so).
Gradient clipping acts after the measurement; weight decay is added by the optimizer, after it too.
"""

from __future__ import annotations

import torch


class NoiseScale:
    """EMA-smoothed unbiased estimates of tr(Sigma) and |G|^2, kept on the device (no host sync per step)."""

    def __init__(self, small: int, big: int, decay: float, device: torch.device):
        if not 0 < small < big:
            raise ValueError(f"noise scale needs two batch sizes 0 < b < B, got b={small}, B={big}")
        self.small, self.big, self.decay = small, big, decay
        self.trace = torch.zeros((), dtype=torch.float64, device=device)  # EMA of tr(Sigma) estimates
        self.grad_sq = torch.zeros((), dtype=torch.float64, device=device)  # EMA of |G|^2 estimates
        self.steps = 0

    def observe(self, small_sq: torch.Tensor, big_sq: torch.Tensor) -> None:
        """One step's |G_b|^2 (averaged over ranks) and |G_B|^2."""
        b, B = self.small, self.big
        small_sq, big_sq = small_sq.double(), big_sq.double()
        grad_sq = (B * big_sq - b * small_sq) / (B - b)
        trace = (small_sq - big_sq) / (1.0 / b - 1.0 / B)
        self.trace.mul_(self.decay).add_(trace, alpha=1 - self.decay)
        self.grad_sq.mul_(self.decay).add_(grad_sq, alpha=1 - self.decay)
        self.steps += 1

    def values(self) -> dict[str, torch.Tensor]:
        """Device tensors: B_simple and the smoothed estimates (the EMA's start-up bias cancels in the ratio)."""
        debias = 1 - self.decay ** max(self.steps, 1)
        return {"b_simple": self.trace / self.grad_sq, "noise_trace": self.trace / debias,
                "noise_grad_sq": self.grad_sq / debias}

    def state_dict(self) -> dict:
        return {"trace": self.trace.item(), "grad_sq": self.grad_sq.item(), "steps": self.steps,
                "small": self.small, "big": self.big}

    def load_state_dict(self, state: dict) -> None:
        """Resume the smoothing; a checkpoint from another layout (other b) restarts it."""
        if not state or state.get("small") != self.small or state.get("big") != self.big:
            return
        self.trace.fill_(state["trace"])
        self.grad_sq.fill_(state["grad_sq"])
        self.steps = state["steps"]


def squared_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of all tensors as a float64 device scalar (torch's foreach total norm, squared)."""
    return torch.nn.utils.get_total_norm(tensors).double().square()
