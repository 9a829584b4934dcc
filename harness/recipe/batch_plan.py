"""The batch plan: how a global batch of B examples is laid out over ranks, micro-steps and ghost-BN groups,
decided and validated in one function (`make_batch_plan`), so B stays the one batch knob and no other code
derives a layout of its own. `harness plan` prints it as arithmetic before any allocation is spent.

A global batch of B examples is cut into A micro-steps of W ranks x m examples. Global batch
position p goes to micro-step p // (W m) and, within it, to rank (p % (W m)) // m, so the ghost-BN
groups of G consecutive positions either lie inside one rank's micro-batch (m a multiple of G) or
span G/m consecutive ranks of the same micro-step (G a multiple of m).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from harness.core.configlib import bounded, positive
from harness.core.errors import PlanError


# The largest global batch accepted: 2^24 = 16,777,216 examples per step, far above the batches large-batch
# studies train (the yaml/ sweeps stop at 2^15). It also bounds the divisor search below (sqrt(2^24) = 4096
# trial divisions per search): an absurd B is refused at once instead of searched for minutes.
MAX_GLOBAL_BATCH = 2**24


@dataclass
class BatchConfig:
    """`batch:` of a run config."""

    # B, the number of examples per optimizer step: the one batch knob; everything else is derived from it.
    global_batch_size: int = bounded(128, gt=0, le=MAX_GLOBAL_BATCH, why="2^24, the largest batch the harness plans")
    # Examples per rank per forward pass. Unset: the largest that fits max_micro_batch_size.
    micro_batch_size: Optional[int] = positive(None)
    max_micro_batch_size: int = positive(256)


@dataclass(frozen=True)
class BatchPlan:
    global_batch_size: int
    world_size: int
    micro_batch_size: int
    accumulation_steps: int
    ghost_batch_size: int | None  # None: the model has no batch norm

    @property
    def ranks_per_ghost_group(self) -> int:
        """How many consecutive ranks share one ghost group (1: groups are local)."""
        g, m = self.ghost_batch_size, self.micro_batch_size
        return g // m if g is not None and m < g else 1

    def micro_slice(self, accum_index: int, rank: int) -> tuple[int, int]:
        """[start, stop) of the positions within the global batch that (micro-step, rank) owns."""
        start = (accum_index * self.world_size + rank) * self.micro_batch_size
        return start, start + self.micro_batch_size

    def describe(self) -> str:
        text = (
            f"{self.global_batch_size} = {self.micro_batch_size} micro x {self.accumulation_steps} accum "
            f"x {self.world_size} ranks"
        )
        g = self.ghost_batch_size
        if g is not None:
            text += f"; {self.global_batch_size // g} ghost groups of {g}"
            if self.ranks_per_ghost_group > 1:
                text += f", each across {self.ranks_per_ghost_group} ranks"
        return text

    def as_dict(self) -> dict:
        return asdict(self)


def _fits(b: int, w: int, m: int, g: int | None) -> bool:
    if b % (w * m):
        return False
    if g is None:
        return True
    if m >= g:
        return m % g == 0
    return g % m == 0 and w % (g // m) == 0


def _ghost_misfit(w: int, m: int, g: int) -> str:
    """Why micro-batch m cannot hold whole ghost-BN groups of g at world size w (the rules of _fits)."""
    if m >= g or g % m:
        return f"micro-batch {m} must be a multiple of the ghost batch size {g}, or a divisor of it"
    return (f"a ghost group of {g} spans {g // m} ranks of micro-batch {m}, which needs {g // m} ranks per group "
            f"dividing the world size {w}")


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def valid_layouts(b: int, w: int, g: int | None, max_m: int | None = None) -> list[tuple[int, int, int]]:
    """Every (W, m, A) with this W that satisfies the plan rules (m <= max_m if given)."""
    if b % w:
        return []
    return [(w, m, b // (w * m)) for m in _divisors(b // w) if (max_m is None or m <= max_m) and _fits(b, w, m, g)]


def _suggest(b: int, w: int, g: int | None, max_m: int | None) -> str:
    layouts = valid_layouts(b, w, g, max_m) or valid_layouts(b, w, g)
    if layouts:
        shown = layouts[-6:]  # the largest micro-batches are the useful ones
        return "valid (W, m, A) for this world size: " + ", ".join(f"({w_}, {m}, {a})" for w_, m, a in shown)
    sizes = [w_ for w_ in _divisors(b) if w_ <= 4096 and valid_layouts(b, w_, g)]
    return f"no micro-batch works with {w} ranks; world sizes that work for B={b}: " + ", ".join(map(str, sizes[:16]))


def make_batch_plan(
    global_batch_size: int,
    world_size: int,
    micro_batch_size: int | None = None,
    max_micro_batch_size: int | None = None,
    ghost_batch_size: int | None = None,
) -> BatchPlan:
    """Decide (W, m, A) for a global batch B. Raise PlanError listing valid choices if impossible.

    m given: check it. m unset: the largest valid m <= max_micro_batch_size (fewest micro-steps).
    """
    b, w, g = global_batch_size, world_size, ghost_batch_size
    for name, value in (("global batch", b), ("world size", w), ("ghost batch size", g), ("micro-batch", micro_batch_size)):
        if value is not None and value <= 0:
            raise PlanError(f"{name} must be positive, got {value}")
        if value is not None and value > MAX_GLOBAL_BATCH:
            raise PlanError(f"{name} {value:,} is larger than the largest global batch, {MAX_GLOBAL_BATCH:,} examples")
    if g is not None and b % g:
        raise PlanError(
            f"global batch {b} is not a multiple of the ghost batch size {g}; "
            f"use a multiple of {g} (e.g. {max(g, b // g * g)}) or change model.ghost_batch_size"
        )
    if b % w:
        raise PlanError(f"global batch {b} does not divide over {w} ranks; {_suggest(b, w, g, max_micro_batch_size)}")
    if micro_batch_size is None:
        layouts = valid_layouts(b, w, g, max_micro_batch_size)
        if not layouts:
            raise PlanError(
                f"no micro-batch <= batch.max_micro_batch_size={max_micro_batch_size} fits B={b} on {w} ranks"
                + (f" with ghost groups of {g}" if g else "") + f"; {_suggest(b, w, g, None)}"
            )
        _, m, _ = layouts[-1]
    else:
        m = micro_batch_size
        if not _fits(b, w, m, g):
            why = f"{b} is not a multiple of {w} ranks x {m}"
            if b % (w * m) == 0 and g is not None:
                why = _ghost_misfit(w, m, g)
            raise PlanError(f"impossible layout (B={b}, W={w}, m={m}): {why}; {_suggest(b, w, g, max_micro_batch_size)}")
    return BatchPlan(b, w, m, b // (w * m), g)


def plan_for(batch: BatchConfig, world_size: int, ghost_batch_size: int | None) -> BatchPlan:
    """The batch plan of a `batch:` config section at a world size (the one call every entry point makes)."""
    return make_batch_plan(batch.global_batch_size, world_size, batch.micro_batch_size, batch.max_micro_batch_size,
                           ghost_batch_size)
