"""What a task minimizes and what it reports. Losses are SUMS over a micro-batch; the engine divides
by the number of examples in the global batch, so the gradient is the mean over B (eq. 1) at any layout.

Each objective returns `(loss_sum, stats)` where stats is a float64 vector [loss_sum, count, extra...]
on the training device that can be summed over micro-steps and ranks; `summarize` reads it on the host (the
trainer does so only at log intervals) and `loss` gives the mean loss as a device tensor. A training batch may carry a third element, the examples'
int64 dropout keys (models.dropout): the objective hands them to the model's KeyedDropout layers.
`state_dict()`/`load_state_dict()` hold what an objective carries from step to step (the language
model's hidden state) for checkpoints; `train_summary(train_loss)` adds task-specific entries to result.json.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.dropout import dropout_keys


def _stats(loss_sum: torch.Tensor, *counts) -> torch.Tensor:
    """[loss_sum, counts...] as a float64 vector on the loss's device. The counts are host integers: torch.full
    writes them on the device without a host-to-device copy (torch.tensor(..., device=cuda) would copy and wait)."""
    parts = [loss_sum.detach().double().reshape(1)]
    parts += [c.double().reshape(1) if isinstance(c, torch.Tensor) else torch.full((1,), float(c), dtype=torch.float64,
                                                                                  device=loss_sum.device) for c in counts]
    return torch.cat(parts)


class Objective:
    """Defaults for objectives that carry nothing between steps and add nothing to result.json."""

    # Which entry of the stats vector the loss is normalized by (the number of examples; tokens for language models).
    loss_count_index = 1

    def loss(self, stats: torch.Tensor) -> torch.Tensor:
        """The mean loss of a (summed) stats vector, on its device: what the divergence check and the final-loss
        window use without reading the value back to the host. Stats of a pack, (runs, k): one loss per run."""
        return stats[..., 0] / stats[..., self.loss_count_index]

    def train_summary(self, train_loss: float | None) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Classification(Objective):
    metric = "test_accuracy"  # percent, as in the paper's tables
    higher_is_better = True
    stat_names = ("loss_sum", "count", "correct")

    def __call__(self, model, batch):
        x, y, *keys = batch
        with dropout_keys(model, keys[0] if keys else None):
            logits = model(x)
        loss_sum = F.cross_entropy(logits.float() if logits.dtype == torch.bfloat16 else logits, y, reduction="sum")
        correct = (logits.argmax(1) == y).sum()
        return loss_sum, _stats(loss_sum, len(y), correct)

    def summarize(self, stats: torch.Tensor) -> dict[str, float]:
        loss_sum, count, correct = stats.tolist()
        return {"loss": loss_sum / count, "accuracy": 100.0 * correct / count}


class Reconstruction(Objective):
    """The autoencoder (Hinton & Salakhutdinov 2006; appendix B.2): outputs in [0, 1] against inputs in [0, 1].

    The reported error, `test_mse` and the training loss alike, is the squared error SUMMED over the pixels
    of an image and averaged over images: the scale of the paper's table 7 (test about 2.9, train about 2.0 on
    MNIST; a per-pixel mean would be 784 times smaller). We train on that same squared error (the engine
    divides the batch's sum by B: mean over images of the per-image sum), so `train_loss` IS the training MSE
    the paper reports; Hinton & Salakhutdinov fine-tuned with cross-entropy instead, which the paper does not
    mention.
    """

    metric = "test_mse"
    higher_is_better = False
    stat_names = ("loss_sum", "count")

    def __call__(self, model, batch):
        x, target, *keys = batch
        with dropout_keys(model, keys[0] if keys else None):
            out = model(x)
        err = out.float() if out.dtype == torch.bfloat16 else out
        loss_sum = (err - target.reshape(err.shape).to(err.dtype)).square().sum()
        return loss_sum, _stats(loss_sum, len(x))

    def summarize(self, stats: torch.Tensor) -> dict[str, float]:
        loss_sum, count = stats.tolist()
        return {"loss": loss_sum / count, "mse": loss_sum / count}


class LanguageModel(Objective):
    """Next-token cross-entropy with the hidden state carried across consecutive batches (Zaremba et al. 2014).

    Loss scale (what `optim.grad_clip_norm` clips): an example is one stream's `unroll` tokens, the loss
    sum is the cross-entropy SUMMED over those time steps, and the engine divides by B streams. The gradient
    is therefore that of the loss summed over the 35 steps and averaged over the batch, exactly the
    quantity Zaremba's Lua code clips at norm 5 (its per-step criterion averages over the batch and the
    gradients of the 35 steps add up). Reported `loss` is per TOKEN (nats), so perplexity = exp(loss);
    `train_loss` in result.json is the per-token loss over the final window and `train_perplexity` its exp.

    The carried state lives here, per block of streams (data_pipelines.text.StreamBatch.streams), detached
    after every step (truncated back-propagation) and dropped at each epoch start; evaluation carries its
    own state along the test stream. state_dict() gathers the training state of all B streams from all
    ranks (a collective: every rank must call it), so a checkpoint resumes at any layout.
    """

    metric = "test_perplexity"
    higher_is_better = False
    stat_names = ("loss_sum", "count", "tokens")
    loss_count_index = 2

    def __init__(self):
        self.hidden: dict[tuple[int, int] | None, tuple[torch.Tensor, torch.Tensor]] = {}
        self.total_streams = 0
        self.restored: torch.Tensor | None = None  # (2, layers, B, hidden) from a checkpoint, until used

    def _state(self, batch):
        if batch.reset:
            return None
        if batch.streams in self.hidden:
            return self.hidden[batch.streams]
        if self.restored is not None and batch.streams is not None:
            lo, hi = batch.streams
            part = self.restored[:, :, lo:hi].to(batch.inputs.device)
            return part[0].contiguous(), part[1].contiguous()
        return None

    def __call__(self, model, batch):
        state = self._state(batch)
        if state is not None:
            state = tuple(s.to(next(model.parameters()).dtype) for s in state)
        with dropout_keys(model, batch.keys):
            logits, new_state = model(batch.inputs, state)
        self.hidden[batch.streams] = (new_state[0].detach(), new_state[1].detach())
        if batch.streams is not None:
            self.total_streams = batch.total_streams
        logits = logits.float() if logits.dtype == torch.bfloat16 else logits
        y = batch.targets
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        return loss_sum, _stats(loss_sum, len(y), y.numel())

    def summarize(self, stats: torch.Tensor) -> dict[str, float]:
        loss_sum, _, tokens = stats.tolist()
        loss = loss_sum / tokens
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}

    def train_summary(self, train_loss: float | None) -> dict[str, float]:
        return {"train_perplexity": math.exp(min(train_loss, 700.0))} if train_loss is not None else {}

    def state_dict(self) -> dict:
        """The carried training state of all B streams, (2, layers, B, hidden) on CPU. Every rank must call it."""
        from harness.train.distributed import all_reduce_sum

        parts = {k: v for k, v in self.hidden.items() if k is not None}
        if not parts:
            return {}
        h, _ = next(iter(parts.values()))
        full = h.new_zeros(2, h.shape[0], self.total_streams, h.shape[2])
        for (lo, hi), (h, c) in parts.items():
            full[0, :, lo:hi], full[1, :, lo:hi] = h, c
        return {"hidden": all_reduce_sum(full).cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.hidden = {}
        self.restored = state.get("hidden")


class Quadratic(Objective):
    """The noisy quadratic model (models/quadratic.py, data_pipelines/nqm.py): the model returns each example's
    loss. `test_loss` is exactly the excess loss 1/2 w^T H w (the test split is the population mean)."""

    metric = "test_loss"
    higher_is_better = False
    stat_names = ("loss_sum", "count")

    def __call__(self, model, batch):
        losses = model(batch[0])
        loss_sum = losses.sum()
        return loss_sum, _stats(loss_sum, len(losses))

    def summarize(self, stats: torch.Tensor) -> dict[str, float]:
        loss_sum, count = stats.tolist()
        return {"loss": loss_sum / count}


def for_task(task: str):
    objectives = {"classification": Classification, "reconstruction": Reconstruction, "language_model": LanguageModel,
                  "quadratic": Quadratic}
    return objectives[task]()
