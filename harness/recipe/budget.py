"""The compute budget (sec. 2), in one home: the `budget:` config, its conversion to optimizer steps, the
epoch of a language model, the final-loss window, and the three budget rules of a sweep.

Durations may be given in steps or epochs; `to_steps` converts every one of them (budget, evaluation and
checkpoint intervals) to steps, once, so the train loop knows nothing but steps. An epoch budget gives
S = floor(epochs N / B): steps shrink as B grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

from harness.core.configlib import positive
from harness.core.errors import ConfigError

# constant_steps: S fixed for every B (table 1); constant_epochs: epochs fixed, S = epochs N / B (fig. 1);
# epoch_sweep: one B, a sweep over epoch budgets (the "unlimited budget" of sec. 7).
BUDGET_RULES = ("constant_steps", "constant_epochs", "epoch_sweep")


@dataclass
class BudgetConfig:
    """`budget:` of a run config. Exactly one: optimizer steps (constant step budget) or epochs."""

    steps: Optional[int] = positive(None)
    epochs: Optional[float] = positive(None)

    def validate(self, path: str) -> None:
        if (self.steps is None) == (self.epochs is None):
            if self.steps is None:
                raise ConfigError(f"config key {path}: set exactly one of {path}.steps or {path}.epochs, the run's "
                                  f"length (neither is set), e.g. --set {path}.epochs=20")
            raise ConfigError(
                f"config key {path}: set exactly one of {path}.steps or {path}.epochs (got both); "
                f"to switch, clear the other, e.g. --set {path}.epochs=null {path}.steps=1000"
            )


@dataclass(frozen=True)
class Durations:
    """Every duration of a run, in optimizer steps (the train loop knows nothing else)."""

    total_steps: int
    eval_every: int | None
    checkpoint_every: int | None
    epochs: float  # total epochs the budget covers (for reporting)

    @property
    def steps_per_epoch(self) -> float:
        return self.total_steps / self.epochs

    @property
    def final_window_start(self) -> int:
        return final_window_start(self.total_steps)


def to_steps(
    budget_steps: int | None,
    budget_epochs: float | None,
    num_examples: int,
    global_batch_size: int,
    eval_every_steps: int | None = None,
    eval_every_epochs: float | None = None,
    checkpoint_every_steps: int | None = None,
    checkpoint_every_epochs: float | None = None,
) -> Durations:
    """Convert the budget and intervals to steps. Epoch budgets give S = floor(epochs N / B) (sec. 2)."""
    steps_per_epoch = num_examples / global_batch_size

    def conv(steps, epochs, what):
        if steps is not None:
            return steps
        if epochs is None:
            return None
        n = math.floor(epochs * steps_per_epoch)
        if n < 1:
            raise ConfigError(
                f"{what} of {epochs} epochs is less than one step of {global_batch_size} examples "
                f"(the training set has {num_examples}); raise it or use a step count"
            )
        return n

    total = conv(budget_steps, budget_epochs, "budget")
    if total is None:
        raise ConfigError("budget: set exactly one of budget.steps or budget.epochs")
    return Durations(
        total_steps=total,
        eval_every=conv(eval_every_steps, eval_every_epochs, "eval interval"),
        checkpoint_every=conv(checkpoint_every_steps, checkpoint_every_epochs, "checkpoint interval"),
        epochs=total / steps_per_epoch,
    )


def lm_steps_per_epoch(num_tokens: int, streams: int, unroll: int) -> int:
    """A language model's epoch in steps, as Zaremba et al.'s reader cuts it: (N // B - 1) // T."""
    return (num_tokens // streams - 1) // unroll


def examples_per_epoch(task: str, num_train: int, global_batch_size: int, unroll: int | None = None) -> int:
    """Examples one epoch holds, for `to_steps` (which divides it by B). A language model's example is one
    stream's `unroll` tokens: B streams x Zaremba's (N // B - 1) // unroll steps; `num_train` counts tokens."""
    if task == "language_model" and unroll is not None:
        return global_batch_size * lm_steps_per_epoch(num_train, global_batch_size, unroll)
    return num_train


def final_window_start(total_steps: int) -> int:
    """First step of the window whose mean training loss is a run's "final training loss": the last
    floor(S/20) steps (at least one), which the schedule spends at its final rate (its last drop is at
    floor(S/2) + 9 floor(S/20) <= S - floor(S/20))."""
    return total_steps - max(1, total_steps // 20)


def _configs(runs: Iterable) -> list[dict]:
    """Resolved config dicts, from dicts or from objects that carry one as `.config` (sweep runs)."""
    return [getattr(r, "config", r) for r in runs]


def budget_rule_of(runs: Iterable) -> str:
    """Which rule a set of runs follows: constant_steps, constant_epochs, epoch_sweep, or mixed."""
    configs = _configs(runs)
    steps = {c["budget"]["steps"] for c in configs}
    epochs = {c["budget"]["epochs"] for c in configs}
    batches = {c["batch"]["global_batch_size"] for c in configs}
    if None not in steps and len(steps) == 1:
        return "constant_steps"
    if None not in epochs and len(epochs) == 1:
        return "constant_epochs"
    if None not in epochs and len(batches) == 1:
        return "epoch_sweep"
    return "mixed"


def check_budget_rule(rule: Optional[str], runs: Iterable) -> None:
    """ConfigError unless the runs follow `rule` (None: no rule declared)."""
    if rule is None:
        return
    configs = _configs(runs)
    found = budget_rule_of(configs)
    if found != rule:
        steps = sorted({c["budget"]["steps"] for c in configs}, key=str)
        epochs = sorted({c["budget"]["epochs"] for c in configs}, key=str)
        batches = sorted({c["batch"]["global_batch_size"] for c in configs})
        need = {"constant_steps": "one budget.steps for every run (and budget.epochs null)",
                "constant_epochs": "one budget.epochs for every run",
                "epoch_sweep": "budget.epochs swept at one batch size"}[rule]
        raise ConfigError(f"sweep spec key budget_rule: {rule} needs {need}; the grid gives budget.steps {steps}, "
                          f"budget.epochs {epochs}, batch sizes {batches}")
