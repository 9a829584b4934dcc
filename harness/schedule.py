"""The paper's learning-rate schedule (sec. 4, appendix B.1).

Over S optimizer steps: hold the initial rate for floor(S/2) steps, then divide it by gamma every
floor(S/20) steps: exactly 10 drops, at floor(S/2) + k floor(S/20) for k = 0..9. With floors, an
11th drop could fall before the end; there is none. Optional linear warm-up (Goyal et al.) is off by default.
"""

from __future__ import annotations

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
