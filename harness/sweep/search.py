"""`search: adaptive` on the local executor: rounds of runs chosen by the rules of harness/sweep/adaptive.py, run
back to back by the ordinary executor (harness/sweep/local.py) in one `harness sweep`, plus its accounting.

    SWEEP_DIR/.sweep/search.json    the rounds (the run ids each planned, and why), then, when the search stops,
                                    the runs used and every grid point left out with why (analyze reads it)

Resuming: a round is recorded before it runs, and the next one is planned only from finished runs once every run
of the recorded rounds has finished. A rerun of the same command first finishes the recorded rounds (the runs
still missing, interrupted ones from their checkpoint), then plans from the same results the same next round:
nothing runs twice. .sweep/runs.json lists only the runs planned so far.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

from harness.core.errors import SweepError
from harness.core.io import atomic_write_json, read_json
from harness.core.status import DIVERGED
from harness.sweep.adaptive import Plan, Rules, plan_group, predicted_start, skip_reasons
from harness.sweep.spec import LR_KEY, Run, Sweep
from harness.sweep.state import hparams_of, result_of, state_dir

BATCH_KEY = "batch.global_batch_size"


@dataclasses.dataclass
class Group:
    key: tuple  # the grid point without lr and seed
    chain: tuple  # the same without the batch size: groups of one chain are searched in order of B
    batch: float
    rates: list[float]
    seeds: list
    runs: dict  # (rate index, seed index) -> Run


def groups_of(sweep: Sweep) -> list[Group]:
    """The sweep's runs as groups, in order of (chain, B)."""
    by_key: dict[tuple, list[Run]] = {}
    for run in sweep.runs:
        key = tuple((k, v) for k, v in run.point.items() if k not in (LR_KEY, "seed"))
        by_key.setdefault(key, []).append(run)
    out = []
    for key, runs in by_key.items():
        rates = sorted({r.point[LR_KEY] for r in runs})
        seeds = list(dict.fromkeys(r.point["seed"] for r in runs))
        chain = tuple((k, v) for k, v in key if k != BATCH_KEY)
        cells = {(rates.index(r.point[LR_KEY]), seeds.index(r.point["seed"])): r for r in runs}
        out.append(Group(key, chain, runs[0].config["batch"]["global_batch_size"], rates, seeds, cells))
    return sorted(out, key=lambda g: (repr(g.chain), g.batch))


def rules_of(sweep: Sweep) -> Rules:
    a = sweep.spec.adaptive
    return Rules(a.window, a.seeds, a.margin, sweep.spec.select.k)


def _result(run: Run, sweep_dir: Path) -> Optional[tuple]:
    r = result_of(run.dir(sweep_dir))
    if r is None or r.get("status") not in ("completed", DIVERGED):
        return None
    if r["status"] == DIVERGED:
        return (None, None), r.get("higher_is_better", True)
    finite = lambda v: v if isinstance(v, (int, float)) and math.isfinite(v) else None  # noqa: E731
    return (finite(r.get(r.get("test_metric"))), finite(r.get("train_loss"))), r.get("higher_is_better", True)


def _seen(group: Group, planned_ids: set, sweep_dir: Path):
    results, planned, higher = {}, {}, True
    for (i, s), run in group.runs.items():
        if run.id in planned_ids:
            planned[i] = planned.get(i, 0) + 1
            got = _result(run, sweep_dir)
            if got is not None:
                results.setdefault(i, []).append(got[0])
                higher = got[1]
    return results, planned, higher


def next_round(sweep: Sweep, sweep_dir: Path, planned_ids: set) -> tuple[list[tuple[Run, str]], list[tuple[Group, Plan]]]:
    """The runs of the next round (with why), and every group's plan."""
    rules = rules_of(sweep)
    plans, previous = [], {}
    for g in groups_of(sweep):
        results, planned, higher = _seen(g, planned_ids, sweep_dir)
        start = None
        if not planned:
            prev = previous.get(g.chain, "first")
            if prev == "first":
                start = predicted_start(g.rates, g.batch, None)
            elif prev is not None:
                start = predicted_start(g.rates, g.batch, prev)
        plan = plan_group(len(g.rates), len(g.seeds), results, planned, start, higher, rules)
        plans.append((g, plan))
        previous[g.chain] = _handover(g, plan, results) if plan.located else None
    runs = [(g.runs[(i, s)], why) for g, plan in plans for i, s, why in plan.runs if (i, s) in g.runs]
    return runs, plans


def _handover(g: Group, plan: Plan, results: dict) -> Optional[tuple]:
    """(B, optimal rate, smallest rate that diverged) for the next batch size's prediction; "first" without an optimum."""
    if plan.optimum is None:
        return "first"
    diverged = [g.rates[i] for i, rs in results.items() if any(r[0] is None and r[1] is None for r in rs)]
    return g.batch, g.rates[plan.optimum], min(diverged, default=None)


# ---------------------------------------------------------------------------------------------- the record

def record_path(sweep_dir: Path) -> Path:
    return state_dir(sweep_dir) / "search.json"


def read_record(sweep_dir: Path) -> dict:
    try:
        return read_json(record_path(sweep_dir))
    except FileNotFoundError:
        return {"search": "adaptive", "rounds": []}


def planned_ids(record: dict) -> set:
    return {rid for rnd in record["rounds"] for rid in rnd["runs"]}


def finish_record(sweep: Sweep, sweep_dir: Path, record: dict) -> dict:
    """Runs used, and every grid point left out with why."""
    rules, ids, skipped = rules_of(sweep), planned_ids(record), []
    for g in groups_of(sweep):
        results, planned, higher = _seen(g, ids, sweep_dir)
        for (i, s), why in sorted(skip_reasons(len(g.rates), len(g.seeds), results, planned, higher, rules).items()):
            if (i, s) in g.runs:
                run = g.runs[(i, s)]
                # the standard hparams too: analyze matches the point to its cell by them
                skipped.append({"id": run.id, "name": run.name, "point": hparams_of(run, sweep.axis_keys), "why": why})
    record.update(done=True, grid_runs=len(sweep.runs), runs_used=len(ids), skipped=skipped)
    atomic_write_json(record_path(sweep_dir), record)
    return record


# ---------------------------------------------------------------------------------------------- the local executor

def run_search(sweep: Sweep, sweep_dir: Path, max_parallel: int, pack: bool, verbose: bool) -> int:
    """Rounds back to back: finish the recorded rounds, plan the next from the results, until the rules stop."""
    from harness.sweep.local import run_sweep

    sweep_dir = Path(sweep_dir)
    state_dir(sweep_dir).mkdir(parents=True, exist_ok=True)
    record = read_record(sweep_dir)
    by_id = {r.id: r for r in sweep.runs}
    unknown = planned_ids(record) - set(by_id)
    if unknown:
        raise SweepError(f"{record_path(sweep_dir)} lists {len(unknown)} runs that this spec does not have (the spec "
                         "changed since the search began); use a new --sweep-dir, or delete that file to search again")
    while True:
        ids = planned_ids(record)
        if ids:
            chosen = dataclasses.replace(sweep, runs=[r for r in sweep.runs if r.id in ids])
            run_sweep(chosen, sweep_dir, max_parallel, pack, verbose)
            left = [r for r in chosen.runs if result_of(r.dir(sweep_dir)) is None
                    or result_of(r.dir(sweep_dir)).get("status") not in ("completed", DIVERGED)]
            if left:
                raise SweepError(f"sweep {sweep.name}: {len(left)} runs of the search's round {len(record['rounds'])} "
                                 "are not finished (held by another executor?); run the same command again when it ends")
        runs, plans = next_round(sweep, sweep_dir, ids)
        if not runs:
            record = finish_record(sweep, sweep_dir, record)
            print(f"search {sweep.name}: done after {len(record['rounds'])} rounds: {record['runs_used']} of "
                  f"{record['grid_runs']} grid runs used ({100 * record['runs_used'] / record['grid_runs']:.0f}%), "
                  f"{len(record['skipped'])} skipped (why: {record_path(sweep_dir)})", flush=True)
            return 0
        why = {}
        for _, w in runs:
            w = w.split(":")[0]
            why[w] = why.get(w, 0) + 1
        record["rounds"].append({"runs": [r.id for r, _ in runs], "why": {r.id: w for r, w in runs}})
        atomic_write_json(record_path(sweep_dir), record)
        active = sum(p.state not in ("done", "waiting") for _, p in plans)
        print(f"search {sweep.name}: round {len(record['rounds'])}: {len(runs)} runs ("
              + ", ".join(f"{n} {w}" for w, n in why.items()) + f") in {active} of {len(plans)} groups", flush=True)


# ---------------------------------------------------------------------------------------------- accounting

def cost_range(sweep: Sweep, examples_of) -> tuple[int, int, float, float]:
    """(fewest runs, typical most runs, their training examples) of the adaptive search, per group: fewest =
    the window at `seeds` seeds plus the optimum's remaining seeds; typical most = two more rates (one widening
    each side) and three confirmed rates. Never more than the group's grid. `examples_of(run)`: steps * B."""
    rules, lo = rules_of(sweep), [0, 0, 0.0, 0.0]
    for g in groups_of(sweep):
        m, n = len(g.rates), len(g.seeds)
        s = min(rules.seeds, n)
        w = min(m, max(rules.window, 1 + 2 * rules.margin))
        fewest = min(m * n, w * s + (n - s))
        most = min(m * n, min(m, w + 2) * s + min(3, m) * (n - s))
        per = sum(examples_of(r) for r in g.runs.values()) / len(g.runs)
        lo[0] += fewest
        lo[1] += most
        lo[2] += fewest * per
        lo[3] += most * per
    return lo[0], lo[1], lo[2], lo[3]
