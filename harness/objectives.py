"""What a task minimizes and what it reports. Losses are SUMS over a micro-batch; the engine divides
by the number of examples in the global batch, so the gradient is the mean over B (eq. 1) at any layout.

Each objective returns `(loss_sum, stats)` where stats is a float64 vector [loss_sum, count, extra...]
that can be summed over micro-steps and ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Classification:
    metric = "test_accuracy"  # percent, as in the paper's tables
    higher_is_better = True
    stat_names = ("loss_sum", "count", "correct")

    def __call__(self, model, batch):
        x, y = batch
        logits = model(x)
        loss_sum = F.cross_entropy(logits.float() if logits.dtype == torch.bfloat16 else logits, y, reduction="sum")
        correct = (logits.argmax(1) == y).sum()
        stats = torch.stack([loss_sum.detach().double(), torch.tensor(float(len(y)), dtype=torch.float64, device=y.device),
                             correct.double()])
        return loss_sum, stats

    def summarize(self, stats: torch.Tensor) -> dict[str, float]:
        loss_sum, count, correct = stats.tolist()
        return {"loss": loss_sum / count, "accuracy": 100.0 * correct / count}


def for_task(task: str):
    objectives = {"classification": Classification}
    return objectives[task]()
