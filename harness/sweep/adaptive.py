"""The adaptive learning-rate search's rules (`search: adaptive`), as pure functions of the results seen so far.

One *group* is the learning-rate axis of one (optimizer, B, other swept keys): its grid rates (ascending, the
spec's log2 axis) and its seeds (the seed axis, in order). A cell is one rate; a rate is *planned* with some
number of the group's seeds. Each round the executor asks `plan_group` what to run next, given every finished
result; the paper's statistics are the ones `harness analyze` uses (harness/recipe/selection.py, sec. 4): the
mean of the best k of a cell's runs, the optimum (best mean), its error bar (every rate whose mean lies within
one std of the optimal cell's mean). Both selections of the analysis are searched: by the test metric and by the
final training loss (the `train_loss` of result.json, lower is better); a rule fires if it fires for either.

1. Locate: `window` rates centred on `start` (see `predicted_start`), shifted inside the grid, with the first
   `seeds` seeds each.
2. Widen: while the optimum or its error bar lies fewer than `margin` grid steps from an edge of the searched
   window (the window's lowest or highest rate), and the grid goes further on that side, add the next rate on
   that side (`seeds` seeds). A rate outside the error bar is by definition worse than the optimum by more than
   one std (or diverged): `margin` such rates bound the optimum on each side. With no finite cell at all (every
   run diverged), widen towards lower rates.
3. Confirm: once no side needs widening, run the remaining seeds (up to all of the seed axis) at every rate that
   can still be optimal: the optimum and every rate whose *optimistic bound* reaches the optimum's band, i.e.
   mean_c - std_c <= mean* + std* (lower is better; mean_c + std_c >= mean* - std* when higher is better),
   std_c the cell's best-k std (the optimum's std when the cell has one value). Diverged cells never qualify.
4. Stop when neither rule fires for either selection: every omitted rate lies beyond the window, which reaches
   at least `margin` steps past the error bar on both sides (or the grid's edge: then the analysis flags the
   edge exactly as it would for the full grid), and every rate that can still be optimal has all its seeds.
   Confirming may move the optimum; the rules are evaluated again after every round.

A group is *located* when rule 2 no longer fires (the next larger B may then start from its optimum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from harness.recipe import selection

# One finished run: (test metric, final training loss); None for a diverged run (the worst value of its cell).
Result = tuple[Optional[float], Optional[float]]


@dataclass(frozen=True)
class Rules:
    window: int = 3
    seeds: int = 2
    margin: int = 1
    k: int = 12  # best k of a cell's runs (select.k)


@dataclass
class Plan:
    runs: list[tuple[int, int, str]] = field(default_factory=list)  # (rate index, seed index, why)
    state: str = "waiting"  # waiting (for a smaller B) | running | widening | confirming | done
    optimum: Optional[int] = None  # the test-metric optimum's rate index, if any

    @property
    def located(self) -> bool:
        return self.state in ("confirming", "done")


@dataclass
class Criterion:
    """One selection over the cells run so far: the optimum and its error bar, as rate indices."""

    stats: dict  # rate index -> selection.Stats
    best: Optional[int]
    low: Optional[int]
    high: Optional[int]
    higher: bool


def criterion(results: dict[int, list[Result]], which: int, higher: bool, k: int) -> Criterion:
    """The paper's optimum and error bar over the cells in `results` by the test metric (which=0) or loss (1)."""
    index = sorted(results)
    stats = {i: selection.best_k([r[which] for r in results[i]], [r[1 - which] for r in results[i]], k, higher)
             for i in index}
    best = selection.optimum([(i,) for i in index], [stats[i] for i in index], higher, ["rate"])
    if best is None:
        return Criterion(stats, None, None, None, higher)
    return Criterion(stats, index[best.index], best.low[0], best.high[0], higher)


def can_be_optimal(c: Criterion, i: int) -> bool:
    """Rule 3: the optimum, or a cell whose optimistic bound (one std towards better) reaches the optimum's band."""
    if c.best is None or i not in c.stats or not math.isfinite(c.stats[i].mean):
        return False
    s, star = c.stats[i], c.stats[c.best]
    spread = star.std if math.isfinite(star.std) else 0.0
    own = s.std if s.k > 1 and math.isfinite(s.std) else spread
    return s.mean + own >= star.mean - spread if c.higher else s.mean - own <= star.mean + spread


def plan_group(n_rates: int, n_seeds: int, results: dict[int, list[Result]], planned: dict[int, int],
               start: Optional[int], higher: bool, rules: Rules) -> Plan:
    """What to run next in one group. `results`: rate index -> finished runs' results; `planned`: rate index ->
    seeds planned so far (the first ones of the axis); `start`: the locate window's centre (None: wait)."""
    if not planned:
        if start is None:
            return Plan()
        lo = max(0, min(start - (rules.window - 1) // 2, n_rates - rules.window))
        rates = range(lo, min(n_rates, lo + rules.window))
        return Plan([(i, s, "locate") for i in rates for s in range(min(rules.seeds, n_seeds))], "widening")
    if any(len(results.get(i, [])) < n for i, n in planned.items()):
        return Plan(state="running")
    a, b = min(planned), max(planned)
    crits = [criterion(results, 0, higher, rules.k), criterion(results, 1, False, rules.k)]
    optimum = crits[0].best
    widen = set()
    for c in crits:
        if c.best is None:  # every run diverged: lower rates are the stable ones
            if a > 0:
                widen.add((a - 1, "widen low: every rate run so far diverged"))
            continue
        if a > 0 and c.low - a < rules.margin:
            widen.add((a - 1, f"widen low: the optimum or its error bar is within {rules.margin} step(s) of the window's edge"))
        if b < n_rates - 1 and b - c.high < rules.margin:
            widen.add((b + 1, f"widen high: the optimum or its error bar is within {rules.margin} step(s) of the window's edge"))
    if widen:
        first = {}
        for i, why in sorted(widen):
            first.setdefault(i, why)
        return Plan([(i, s, why) for i, why in first.items() for s in range(min(rules.seeds, n_seeds))], "widening", optimum)
    confirm = sorted(i for i in planned if planned[i] < n_seeds and any(can_be_optimal(c, i) for c in crits))
    if confirm:
        return Plan([(i, s, "confirm: can still be optimal") for i in confirm for s in range(planned[i], n_seeds)],
                    "confirming", optimum)
    return Plan(state="done", optimum=optimum)


def skip_reasons(n_rates: int, n_seeds: int, results: dict[int, list[Result]], planned: dict[int, int],
                 higher: bool, rules: Rules) -> dict[tuple[int, int], str]:
    """(rate index, seed index) -> why a done group left that grid point out."""
    if not planned:
        return {}
    a, b = min(planned), max(planned)
    crits = [criterion(results, 0, higher, rules.k), criterion(results, 1, False, rules.k)]
    bars = "; ".join(f"{name} error bar at steps {c.low}..{c.high}" for name, c in zip(("test-metric", "training-loss"), crits)
                     if c.best is not None) or "every rate run diverged"
    out = {}
    for i in range(n_rates):
        if i not in planned:
            side = "below" if i < a else "above"
            out.update({(i, s): f"outside the searched window (steps {a}..{b}), {side} it ({bars})" for s in range(n_seeds)})
        else:
            for s in range(planned[i], n_seeds):
                out[(i, s)] = "cannot be optimal: its optimistic bound (mean - std of its first seeds) misses the optimum's band"
    return out


def predicted_start(rates: Sequence[float], batch: float, previous: Optional[tuple[float, float, Optional[float]]]) -> int:
    """The locate window's centre in `rates` (ascending): the grid's middle for the first batch size; else the
    linear scaling rule (sec. 3.2) from the previous (smaller) batch size's optimum, `previous` = (B, optimal rate,
    smallest rate that diverged there or None), clamped to the largest rate below the one that diverged, and
    snapped to the nearest grid rate in log2 (ties: the smaller)."""
    if previous is None:
        return (len(rates) - 1) // 2
    b_prev, best, unstable = previous
    want = best * batch / b_prev
    if unstable is not None:
        want = min(want, max([r for r in rates if r < unstable], default=rates[0]))
    return min(range(len(rates)), key=lambda i: (abs(math.log2(rates[i]) - math.log2(want)), i))
