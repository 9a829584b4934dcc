"""`search: adaptive` on the executors: rounds of runs chosen by the rules of harness/sweep/adaptive.py, run by
the ordinary executors, plus its accounting. Locally the rounds run back to back in one `harness sweep`
(harness/sweep/local.py); on SLURM each round is job arrays (harness/sweep/slurm.py) and a small planner job
(`--dependency=afterany` on them) runs the same command again, which plans and submits the next round.

    SWEEP_DIR/.sweep/search.json    the rounds (the run ids each planned, and why), the planner jobs, then, when
                                    the search stops, the runs used and every grid point left out with why
                                    (analyze reads it)
    SWEEP_DIR/.sweep/search.lock    held while a round is planned and submitted (SLURM: planner job or rerun)

Resuming: a round is recorded before it runs, and the next one is planned only from finished runs once every run
of the recorded rounds has finished. A rerun of the same command first finishes the recorded rounds (the runs
still missing, interrupted ones from their checkpoint), then plans from the same results the same next round:
nothing runs twice. .sweep/runs.json lists only the runs planned so far.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

from harness.core import status as run_status
from harness.core.errors import LaunchError, SweepError
from harness.core.io import atomic_write_json, read_json
from harness.core.paths import REPO_ROOT
from harness.sweep.adaptive import Plan, Rules, plan_group, predicted_start, skip_reasons
from harness.sweep.spec import LR_KEY, Run, Sweep
from harness.sweep.state import hparams_of, is_finished, prepare, result_of, state_dir, status

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
    """((test metric, train loss), higher is better) of a finished run; (None, None) for a diverged one."""
    r = result_of(run.dir(sweep_dir))
    if not run_status.is_finished(r):
        return None
    if r["status"] == run_status.DIVERGED:
        return (None, None), r.get("higher_is_better", True)

    def finite(v):
        return v if isinstance(v, (int, float)) and math.isfinite(v) else None

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

def run_search(sweep: Sweep, sweep_dir: Path, max_parallel: int, pack: Optional[bool], verbose: bool) -> int:
    """Rounds back to back: finish the recorded rounds, plan the next from the results, until the rules stop."""
    from harness.sweep.local import run_sweep

    sweep_dir = Path(sweep_dir)
    state_dir(sweep_dir).mkdir(parents=True, exist_ok=True)
    record = read_record(sweep_dir)
    _check_known(sweep, sweep_dir, record)
    while True:
        ids = planned_ids(record)
        if ids:
            chosen = dataclasses.replace(sweep, runs=[r for r in sweep.runs if r.id in ids])
            run_sweep(chosen, sweep_dir, max_parallel, pack, verbose)
            left = [r for r in chosen.runs if not is_finished(r.dir(sweep_dir))]
            if left:
                raise SweepError(f"sweep {sweep.name}: {len(left)} runs of the search's round {len(record['rounds'])} "
                                 "are not finished (held by another executor?); run the same command again when it ends")
        with planning_lock(sweep_dir):
            fresh = read_record(sweep_dir)
            if planned_ids(fresh) != ids:  # another executor planned a round meanwhile: run that one
                record = fresh
                continue
            runs, plans = next_round(sweep, sweep_dir, ids)
            if not runs:
                _say_done(sweep, sweep_dir, finish_record(sweep, sweep_dir, record))
                return 0
            _record_round(sweep, sweep_dir, record, runs, plans)


@contextlib.contextmanager
def planning_lock(sweep_dir: Path):
    """Held while a round is planned and recorded (and, on SLURM, submitted): two executors, a planner job and
    a rerun, never record the same round twice. flock(2): the kernel drops it with a killed holder."""
    with open(state_dir(sweep_dir) / "search.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _check_known(sweep: Sweep, sweep_dir: Path, record: dict) -> None:
    unknown = planned_ids(record) - {r.id for r in sweep.runs}
    if unknown:
        raise SweepError(f"{record_path(sweep_dir)} lists {len(unknown)} runs that this spec does not have (the spec "
                         "changed since the search began); use a new --sweep-dir, or delete that file to search again")


def _record_round(sweep: Sweep, sweep_dir: Path, record: dict, runs: list, plans: list) -> None:
    """Append the next round to the record (before any of its runs starts: a rerun then runs the same round)."""
    why: dict = {}
    for _, w in runs:
        why[w.split(":")[0]] = why.get(w.split(":")[0], 0) + 1
    record["rounds"].append({"runs": [r.id for r, _ in runs], "why": {r.id: w for r, w in runs}})
    atomic_write_json(record_path(sweep_dir), record)
    active = sum(p.state not in ("done", "waiting") for _, p in plans)
    print(f"search {sweep.name}: round {len(record['rounds'])}: {len(runs)} runs ("
          + ", ".join(f"{n} {w}" for w, n in why.items()) + f") in {active} of {len(plans)} groups", flush=True)


def _say_done(sweep: Sweep, sweep_dir: Path, record: dict) -> None:
    print(f"search {sweep.name}: done after {len(record['rounds'])} rounds: {record['runs_used']} of "
          f"{record['grid_runs']} grid runs used ({100 * record['runs_used'] / record['grid_runs']:.0f}%), "
          f"{len(record['skipped'])} skipped (why: {record_path(sweep_dir)})", flush=True)


# ---------------------------------------------------------------------------------------------- accounting

def cost_range(sweep: Sweep, examples_of) -> tuple[int, int, float, float]:
    """(fewest runs, typical most runs, their training examples) of the adaptive search, per group: fewest =
    the window at `seeds` seeds plus the optimum's remaining seeds; typical most = two more rates (one widening
    each side) and three confirmed rates. Never more than the group's grid. `examples_of(run)`: steps * B."""
    rules, total = rules_of(sweep), [0, 0, 0.0, 0.0]
    for g in groups_of(sweep):
        m, n = len(g.rates), len(g.seeds)
        s = min(rules.seeds, n)
        w = min(m, max(rules.window, 1 + 2 * rules.margin))
        fewest = min(m * n, w * s + (n - s))
        most = min(m * n, min(m, w + 2) * s + min(3, m) * (n - s))
        per_run = sum(examples_of(r) for r in g.runs.values()) / len(g.runs)
        for i, x in enumerate((fewest, most, fewest * per_run, most * per_run)):
            total[i] += x
    return total[0], total[1], total[2], total[3]


# ---------------------------------------------------------------------------------------------- the SLURM executor

PLANNER_ENV = "HARNESS_SEARCH_PLANNER"  # set in the planner job: a round whose runs failed twice stops the chain


def submit_search(sweep: Sweep, sweep_dir: Path, spec_path: Path, max_parallel: int, pack: Optional[bool]) -> int:
    """One planning step on SLURM, run by `harness sweep --executor slurm` and by each planner job: submit the
    recorded round's missing runs, or plan and record the next round and submit it, as job arrays; then a small
    planner job (`--dependency=afterany` on those arrays) that runs this same command when they have ended."""
    sweep_dir = Path(sweep_dir)
    state_dir(sweep_dir).mkdir(parents=True, exist_ok=True)
    with planning_lock(sweep_dir):
        return _submit_step(sweep, sweep_dir, Path(spec_path).resolve(), max_parallel, pack)


def _submit_step(sweep: Sweep, sweep_dir: Path, spec_path: Path, max_parallel: int, pack: Optional[bool]) -> int:
    from harness.sweep.slurm import submit_missing

    record = read_record(sweep_dir)
    _check_known(sweep, sweep_dir, record)
    ids = planned_ids(record)
    if ids:
        chosen = dataclasses.replace(sweep, runs=[r for r in sweep.runs if r.id in ids])
        st = status(prepare(chosen, sweep_dir), sweep_dir)
        if st.running or st.queued:
            waiting = sorted({job.split("_")[0] for _, job in st.queued})
            print(f"search {sweep.name}: round {len(record['rounds'])}: {len(st.queued)} runs queued, "
                  f"{len(st.running)} running", flush=True)
            _planner(sweep, sweep_dir, record, spec_path, max_parallel, pack, waiting)
            return 0
        if st.missing:
            last = record["rounds"][-1]
            if os.environ.get(PLANNER_ENV) and last.get("submissions", 1) >= 2:
                raise SweepError(f"sweep {sweep.name}: {len(st.missing)} runs of the search's round {len(record['rounds'])} "
                                 "failed twice (see error.txt in their run directories); fix the cause and run the "
                                 "same command again")
            last["submissions"] = last.get("submissions", 1) + 1
            atomic_write_json(record_path(sweep_dir), record)
            jobs = submit_missing(chosen, sweep_dir, max_parallel, pack, False)
            _planner(sweep, sweep_dir, record, spec_path, max_parallel, pack, jobs)
            return 0
    runs, plans = next_round(sweep, sweep_dir, ids)
    if not runs:
        record = finish_record(sweep, sweep_dir, record)
        _say_done(sweep, sweep_dir, record)
        return 0
    _record_round(sweep, sweep_dir, record, runs, plans)
    chosen = dataclasses.replace(sweep, runs=[r for r in sweep.runs if r.id in planned_ids(record)])
    jobs = submit_missing(chosen, sweep_dir, max_parallel, pack, False)
    _planner(sweep, sweep_dir, record, spec_path, max_parallel, pack, jobs)
    return 0


def _planner(sweep: Sweep, sweep_dir: Path, record: dict, spec_path: Path, max_parallel: int, pack: Optional[bool],
             after: list[str]) -> None:
    """Submit the planner job (this command again, after `after` whatever their end), unless one is waiting."""
    mine = os.environ.get("SLURM_JOB_ID")
    alive = _alive([j for j in record.get("planners", []) if j != mine])
    if alive:
        print(f"search {sweep.name}: planner job {alive[0]} will plan the next round", flush=True)
        return
    slurm, logs = sweep.spec.slurm, state_dir(sweep_dir).resolve() / "slurm"
    logs.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "harness", "sweep", str(spec_path), "--executor", "slurm", "--sweep-dir",
               str(sweep_dir.resolve()), "--max-parallel", str(max_parallel)] + {True: ["--pack"], False: ["--no-pack"], None: []}[pack]
    cmd = ["sbatch", "--parsable", f"--job-name=plan-{sweep.name}", f"--output={logs}/plan-%j.out", "--ntasks=1",
           "--time=00:30:00", f"--chdir={Path.cwd()}", f"--export=ALL,PYTHONPATH={REPO_ROOT},{PLANNER_ENV}=1"]
    cmd += [f"{flag}={value}" for flag, value in (("--partition", slurm.partition), ("--account", slurm.account))
            if value is not None]
    if after:
        cmd.append("--dependency=afterany:" + ":".join(after))
    cmd += ["--wrap", shlex.join(command)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise LaunchError("sbatch not found: the slurm executor needs SLURM's client commands on PATH; "
                          "use --executor local here") from None
    job = proc.stdout.strip().split(";")[0]
    if proc.returncode != 0 or not job.isdigit():
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise LaunchError(f"sbatch of the search's planner job failed (exit {proc.returncode}): "
                          f"{msg[-1] if msg else 'no message'}; run the same command again when its arrays have ended")
    record.setdefault("planners", []).append(job)
    atomic_write_json(record_path(sweep_dir), record)
    print(f"search {sweep.name}: planner job {job} plans round {len(record['rounds']) + 1} after "
          f"{', '.join(after) or 'now'} (afterany)", flush=True)


def _alive(jobs: list[str]) -> list[str]:
    """The jobs of `jobs` that squeue still lists (pending or running)."""
    if not jobs:
        return []
    try:
        proc = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(jobs)], capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return []
    return [j for j in proc.stdout.split() if j in jobs] if proc.returncode == 0 else []
