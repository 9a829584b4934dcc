"""The noisy quadratic model (NQM; Zhang et al. 2019, "Which Algorithmic Choices Matter at Which Batch Sizes?
Insights From a Noisy Quadratic Model", sec. 2) as a dataset the real trainer reads: `data.name: nqm`.

The loss is L(w) = 1/2 w^T H w with a diagonal H = diag(h_1 .. h_d), h_j = lambda_max * j^-power (power 1 is
Zhang et al.'s h_j = 1/j; power 0 is isotropic), and minibatch gradients whose noise covariance is proportional
to H. It is written as an ordinary finite training set of N per-example targets x_i in R^d with, for every j,
exactly zero mean and exactly variance sigma^2 / h_j over the N examples (standard normal draws, then centred and
rescaled column by column). The model (models/quadratic.py) gives example i the loss

    l_i(w) = 1/2 (w - x_i)^T H (w - x_i) - 1/2 x_i^T H x_i = 1/2 w^T H w - w^T H x_i,

so the per-example gradient is H (w - x_i): its mean over the data is H w (the true gradient, since the x_i sum to
zero) and its covariance is H Cov(x) H = sigma^2 H (Sigma = sigma^2 H). Leaving out the w-independent term
1/2 x_i^T H x_i changes no gradient; it makes the mean loss over the data exactly 1/2 w^T H w (the excess loss: its
minimum is 0 at w = 0), so the minibatch training loss fluctuates only by w^T H xbar_B.

The "test split" is one point, x = 0 (the population mean): `test_loss` is exactly 1/2 w^T H w, without sampling.

Closed forms (the probe's tests check the harness against them):
- the curvature constraint (sec. 3.1 of Smith, Elsen & De): SGD is stable for eps < eps_crit = 2 / lambda_max;
  heavy-ball momentum (v <- m v + g, w <- w - lr v) is stable for lr h < 2 (1 + m), so in the harness's
  eps_eff = lr / (1 - m) (sec. 3.3) eps_eff < 2 (1 + m) / ((1 - m) lambda_max): 38 / lambda_max at m = 0.9.
  The noise is additive (its covariance does not depend on w), so neither depends on B.
- the gradient noise scale (McCandlish et al. 2018, eq. 2.8): B_simple(w) = tr(Sigma) / |G|^2
  = sigma^2 tr(H) / |H w|^2; with models/quadratic.py's initialisation (every direction at loss init^2 / 2)
  B_simple(w0) = sigma^2 / init^2, and so is B_noise = tr(H Sigma) / (G^T H G).

Files: `harness data synth nqm DIR` writes DIR/manifest.json only (the targets are regenerated from its seed, in
milliseconds); training batches follow the same example order as every in-memory reader (data_pipelines/order.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipelines.order import DeviceOrder
from data_pipelines.shards import write_manifest
from data_pipelines.spec import DataSpec
from harness.core.errors import DataError

NQM_TAG = 0x5EED_0004  # the targets' random stream (data_pipelines/order.py has the other tags)
TASK = "quadratic"


def spectrum(dim: int, lambda_max: float, power: float) -> np.ndarray:
    """h_j = lambda_max * j^-power, j = 1 .. dim (largest first)."""
    return lambda_max * np.arange(1, dim + 1, dtype=np.float64) ** -float(power)


def synth_nqm(dest: str | Path, train: int = 16384, dim: int = 32, lambda_max: float = 1.0, power: float = 1.0,
              sigma: float = 1.0, seed: int = 0) -> dict:
    """Write the manifest of an NQM dataset (nothing else: the targets are a function of it)."""
    for name, value in (("train", train), ("dim", dim), ("lambda_max", lambda_max), ("sigma", sigma)):
        if not value > 0:
            raise DataError(f"nqm: {name} must be positive, got {value}")
    if train < 2:
        raise DataError(f"nqm: give at least 2 training examples (--train), got {train}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    h = spectrum(dim, lambda_max, power)
    manifest = {
        "kind": "nqm", "task": TASK, "image_shape": [dim], "classes": [], "synthetic": True,
        "nqm": {"dim": dim, "lambda_max": lambda_max, "power": power, "sigma": sigma, "seed": seed,
                "curvature": h.tolist()},
        "splits": {"train": {"size": train, "shards": []}, "test": {"size": 1, "shards": []}},
    }
    write_manifest(dest, manifest)
    return manifest


def parameters(manifest: dict) -> dict:
    """The NQM block of a manifest (dim, lambda_max, power, sigma, seed, curvature); DataError if absent."""
    block = manifest.get("nqm")
    if not isinstance(block, dict) or "curvature" not in block:
        raise DataError("the manifest has no nqm block; re-create the directory with `harness data synth nqm DIR`")
    return block


def targets(manifest: dict) -> np.ndarray:
    """The N x d per-example targets, float64: per column exactly mean 0 and variance sigma^2 / h_j."""
    p = parameters(manifest)
    n, h = manifest["splits"]["train"]["size"], np.asarray(p["curvature"], dtype=np.float64)
    z = np.random.default_rng([NQM_TAG, int(p["seed"])]).standard_normal((n, len(h)))
    z -= z.mean(axis=0)
    z /= np.sqrt((z * z).mean(axis=0))  # population variance exactly 1 (the sampler draws from these N)
    return z * (p["sigma"] / np.sqrt(h))


def b_simple(curvature, sigma: float, w) -> float:
    """McCandlish et al.'s B_simple = tr(Sigma) / |G|^2 = sigma^2 tr(H) / |H w|^2 at weights w."""
    h, w = np.asarray(curvature, dtype=np.float64), np.asarray(w, dtype=np.float64)
    return float(sigma ** 2 * h.sum() / np.sum((h * w) ** 2))


def critical_lr(lambda_max: float, momentum: float = 0.0) -> float:
    """The largest stable eps_eff: 2 / lambda_max for SGD, 2 (1 + m) / ((1 - m) lambda_max) for heavy ball."""
    return 2.0 * (1.0 + momentum) / ((1.0 - momentum) * lambda_max)


class NoisyQuadratic:
    """The reader: global batch i is stream positions [iB, (i+1)B) of order.ExampleOrder(N, seed), as for the
    in-memory images, so batches are the same at every layout; this rank's micro-batch (a, r) is
    plan.micro_slice(a, r) of it. Batches are 1-tuples (targets,), which the quadratic objective reads."""

    def __init__(self, path, manifest, plan, seed, rank, device, dtype, eval_batch_size):
        import torch

        p = parameters(manifest)
        self.plan, self.rank, self.eval_batch_size = plan, rank, eval_batch_size
        self.targets = torch.from_numpy(targets(manifest)).to(device, dtype)
        self.order = DeviceOrder(len(self.targets), seed, device)
        self.origin = torch.zeros(1, len(p["curvature"]), device=device, dtype=dtype)
        self.spec = DataSpec(kind="nqm", task=TASK, num_train=len(self.targets), num_test=1,
                             in_shape=(len(p["curvature"]),), curvature=tuple(p["curvature"]))

    def train_micro_batches(self, step: int) -> list[tuple]:
        base = step * self.plan.global_batch_size
        out = []
        for a in range(self.plan.accumulation_steps):
            lo, hi = self.plan.micro_slice(a, self.rank)
            index, _ = self.order.lookup(base + lo, base + hi)
            out.append((self.targets[index],))
        return out

    def eval_batches(self, split: str = "test"):
        """test: the population mean x = 0 on rank 0 (exactly 1/2 w^T H w); train: this rank's share of the targets."""
        if split == "test":
            if self.rank == 0:
                yield (self.origin,)
            return
        n, w = len(self.targets), self.plan.world_size
        lo, hi = self.rank * n // w, (self.rank + 1) * n // w
        for start in range(lo, hi, self.eval_batch_size):
            yield (self.targets[start:min(hi, start + self.eval_batch_size)],)
