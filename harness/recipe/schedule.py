"""The paper's learning-rate schedule (sec. 4, appendix B.1).

Over S optimizer steps: hold the initial rate for floor(S/2) steps, then divide it by gamma every
floor(S/20) steps: exactly 10 drops, at floor(S/2) + k floor(S/20) for k = 0..9. With floors, an
11th drop could fall before the end; there is none. Optional linear warm-up (Goyal et al.) is off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

NUM_DECAYS = 10


def decay_factor(initial: float, gamma: float = 2.0, final: float | None = None) -> float:
    """gamma, or (initial / final) ** (1/10) when the final rate is given (sec. 7.1)."""
    return (initial / final) ** (1.0 / NUM_DECAYS) if final is not None else gamma


def num_drops(step: int, total_steps: int) -> int:
    """How many times the rate has been divided by gamma at `step` (0-based)."""
    hold, interval = total_steps // 2, total_steps // 20
    if step < hold:
        return 0
    if interval == 0:  # fewer than 20 steps: all 10 drops at once after the hold
        return NUM_DECAYS
    return min(NUM_DECAYS, (step - hold) // interval + 1)


def lr_at(step: int, total_steps: int, initial: float, gamma: float, warmup_steps: int = 0) -> float:
    lr = initial * gamma ** -num_drops(step, total_steps)
    if warmup_steps and step < warmup_steps:
        lr *= (step + 1) / warmup_steps
    return lr


@dataclass(frozen=True)
class Schedule:
    """One run's schedule: the effective rate at every step of an S-step run."""

    initial: float  # eps_eff at step 0 (after warm-up)
    gamma: float
    total_steps: int
    warmup_steps: int = 0

    @classmethod
    def of(cls, effective_lr: float, decay: float, final_lr: float | None, total_steps: int, warmup_steps: int = 0):
        """From the config's optim.effective_lr and schedule.{decay_factor, final_lr, warmup_steps}."""
        return cls(effective_lr, decay_factor(effective_lr, decay, final_lr), total_steps, warmup_steps)

    def at(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.initial, self.gamma, self.warmup_steps)

    def changes_at(self, step: int) -> bool:
        """Whether the rate at `step` may differ from the rate at step - 1 (a drop or warm-up)."""
        return step == 0 or step <= self.warmup_steps or num_drops(step, self.total_steps) != num_drops(step - 1, self.total_steps)
