"""`search: adaptive`: the rules on synthetic results (pure functions), the spec option's checks, the dry-run's
cost comparison, and real searches through the local executor and on the test SLURM cluster: the same optima and
error bars as the full grid, and a search stopped between rounds (or by SIGTERM) resumes without running
anything twice."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from harness import cli
from harness.recipe import selection
from harness.sweep.adaptive import Rules, can_be_optimal, criterion, plan_group, predicted_start, skip_reasons
from tests.conftest import ROOT, harness_env, run_harness, write_config

RULES = Rules(window=3, seeds=2, margin=1, k=2)


def main(args: list[str]) -> int:
    """`harness ARGS` in this process: its exit code."""
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    return e.value.code


def curve(i: int, seed: int, best: int = 5) -> tuple:
    """A synthetic (test accuracy, train loss) at rate index i: a parabola in log2(lr) plus a seed's offset;
    rates above 8 diverge."""
    if i > 8:
        return (None, None)
    noise = (seed - 1) * 0.1
    return (100.0 - (i - best) ** 2 + noise, 0.1 + 0.05 * (i - best) ** 2 - noise / 10)


def simulate(n_rates: int, n_seeds: int, start: int, rules: Rules = RULES, best: int = 5):
    """The search's rounds on one group, results from `curve`: (results, planned, rounds)."""
    results, planned, rounds = {}, {}, 0
    while True:
        plan = plan_group(n_rates, n_seeds, results, planned, start, True, rules)
        if not plan.runs:
            assert plan.state == "done"
            return results, planned, rounds
        rounds += 1
        for i, s, _ in plan.runs:
            planned[i] = planned.get(i, 0) + 1
            results.setdefault(i, []).append(curve(i, s, best))


def full_grid(n_rates: int, n_seeds: int, best: int = 5) -> dict:
    return {i: [curve(i, s, best) for s in range(n_seeds)] for i in range(n_rates)}


def test_locate_centres_the_window_and_shifts_it_inside_the_grid():
    assert plan_group(9, 4, {}, {}, None, True, RULES).state == "waiting"
    plan = plan_group(9, 4, {}, {}, 4, True, RULES)
    assert sorted({(i, s) for i, s, _ in plan.runs}) == [(i, s) for i in (3, 4, 5) for s in (0, 1)]
    assert {i for i, _, _ in plan_group(9, 4, {}, {}, 0, True, RULES).runs} == {0, 1, 2}
    assert {i for i, _, _ in plan_group(9, 4, {}, {}, 8, True, RULES).runs} == {6, 7, 8}


def test_widen_where_the_optimum_touches_the_window_edge_and_nowhere_else():
    results = {i: [curve(i, s) for s in range(2)] for i in (2, 3, 4)}  # optimum at 5: the window's top is 4
    plan = plan_group(12, 4, results, {2: 2, 3: 2, 4: 2}, 3, True, RULES)
    assert plan.state == "widening" and {i for i, _, _ in plan.runs} == {5}
    assert all(why.startswith("widen high") for _, _, why in plan.runs)
    # bracketed on both sides by a worse rate: no widening, confirm instead
    results = {i: [curve(i, s) for s in range(2)] for i in (4, 5, 6)}
    plan = plan_group(12, 4, results, {4: 2, 5: 2, 6: 2}, 5, True, RULES)
    assert plan.state == "confirming" and {i for i, _, _ in plan.runs} == {5}
    assert {s for _, s, _ in plan.runs} == {2, 3}


def test_widening_stops_at_the_grid_edge():
    results = {i: [curve(i, s, best=0) for s in range(2)] for i in (0, 1, 2)}
    plan = plan_group(9, 2, results, {0: 2, 1: 2, 2: 2}, 1, True, RULES)
    assert plan.state == "done"  # the optimum sits on the grid's low edge: analyze flags it, as for the full grid


def test_every_rate_diverged_widens_towards_lower_rates():
    results = {i: [(None, None)] * 2 for i in (9, 10, 11)}
    plan = plan_group(12, 4, results, {9: 2, 10: 2, 11: 2}, 10, True, RULES)
    assert {i for i, _, _ in plan.runs} == {8}
    assert "diverged" in plan.runs[0][2]


def test_a_diverged_rate_bounds_the_optimum():
    results = {7: [curve(7, s, best=8) for s in range(2)], 8: [curve(8, s, best=8) for s in range(2)],
               9: [(None, None)] * 2}
    plan = plan_group(12, 2, results, {7: 2, 8: 2, 9: 2}, 8, True, RULES)
    assert plan.state == "done"


def test_confirm_runs_every_rate_whose_optimistic_bound_reaches_the_optimum():
    results = {3: [(90.0, 1.0), (90.2, 0.9)], 4: [(95.0, 0.5), (97.0, 0.4)], 5: [(94.0, 0.55), (96.5, 0.45)],
               6: [(80.0, 2.0), (80.1, 2.1)]}
    planned = {i: 2 for i in results}
    c = criterion(results, 0, True, 2)
    assert c.best == 4 and [can_be_optimal(c, i) for i in (3, 4, 5, 6)] == [False, True, True, False]
    plan = plan_group(8, 4, results, planned, 4, True, RULES)
    assert plan.state == "confirming" and sorted({i for i, _, _ in plan.runs}) == [4, 5]
    for i, s, _ in plan.runs:  # the confirmed seeds
        results[i].append((results[i][0][0], results[i][0][1]))
        planned[i] += 1
    assert plan_group(8, 4, results, planned, 4, True, RULES).state == "done"
    reasons = skip_reasons(8, 4, results, planned, True, RULES)
    assert reasons[(3, 2)].startswith("cannot be optimal") and reasons[(0, 0)].startswith("outside the searched window")
    assert set(reasons) == {(i, s) for i in (0, 1, 2, 7) for s in range(4)} | {(i, s) for i in (3, 6) for s in (2, 3)}


def test_the_next_batch_size_starts_from_the_linear_scaling_rule_clamped_by_the_unstable_rate():
    rates = [2.0 ** e for e in range(-6, 4)]
    assert predicted_start(rates, 64, None) == 4  # the grid's middle
    assert rates[predicted_start(rates, 64, (32, 0.25, None))] == 0.5  # doubled with B
    assert rates[predicted_start(rates, 256, (32, 0.25, 1.0))] == 0.5  # below the rate that diverged at B = 32
    assert rates[predicted_start(rates, 64, (16, 8.0, None))] == 8.0  # clamped to the grid


@pytest.mark.parametrize("best,start", [(5, 5), (5, 1), (2, 7), (8, 4)])
def test_the_search_selects_the_full_grids_optimum_and_error_bar(best, start):
    results, planned, rounds = simulate(12, 4, start, best=best)
    full = full_grid(12, 4, best)
    for which, higher in ((0, True), (1, False)):
        a, f = criterion(results, which, higher, 2), criterion(full, which, higher, 2)
        assert (a.best, a.low, a.high) == (f.best, f.low, f.high)
        assert planned[a.best] == 4  # the optimum has every seed
    assert sum(planned.values()) < 0.5 * 12 * 4


def test_stats_of_a_cell_are_the_papers_best_k():
    # the rules reuse the analysis's statistics: the same best-k mean as `harness analyze`
    c = criterion({0: [(1.0, 0.0), (3.0, 0.0), (2.0, 0.0)]}, 0, True, 2)
    assert c.stats[0].mean == selection.best_k([1.0, 3.0, 2.0], [0, 0, 0], 2, True).mean == 2.5


# ---------------------------------------------------------------------------------------------- the spec and CLI

def spec(tmp_path, digits, search="adaptive", extra="", seeds="{range: 3}", lr="{log2: [-6, 3]}", name="small"):
    return write_config(tmp_path / f"{name}.yaml", f"""
name: {name}
base:
  model: {{name: mlp, hidden: [16]}}
  data: {{name: digits, path: {digits}}}
  batch: {{global_batch_size: 32}}
  budget: {{steps: 60}}
  device: cpu
  log: {{every_steps: 20}}
grid:
  batch.global_batch_size: [16, 64]
  optim.effective_lr: {lr}
  seed: {seeds}
select: {{k: 2, n: 3}}
search: {search}
{extra}
""")


@pytest.mark.parametrize("kwargs,words", [
    (dict(search="adaptiv"), "search"),
    (dict(seeds="[0]"), "at least adaptive.seeds = 2"),
    (dict(lr="[0.1, 0.2, 0.4]"), "log2 axis optim.effective_lr"),
    (dict(extra="adaptive: {window: 0}"), "adaptive.window"),
    (dict(extra="adaptive: {windows: 3}"), "windows"),
])
def test_a_bad_search_option_is_a_one_line_config_error(tmp_path, digits_shards, capsys, kwargs, words):
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", str(spec(tmp_path, digits_shards, **kwargs)), "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and words in err and err.startswith("harness: error:")


def test_slurm_refuses_wait_with_the_adaptive_search(tmp_path, digits_shards, capsys):
    code = main(["sweep", str(spec(tmp_path, digits_shards)), "--executor", "slurm", "--wait", "--sweep-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--wait with search: adaptive" in err and len(err.splitlines()) == 1


def test_dry_run_prints_the_full_and_the_adaptive_cost_side_by_side(tmp_path, digits_shards, capsys):
    for search in ("adaptive", "grid"):
        assert main(["sweep", str(spec(tmp_path, digits_shards, search)), "--dry-run", "--throughput", "1000"]) == 0
        out = capsys.readouterr().out
        full = next(line for line in out.splitlines() if line.strip().startswith("full grid"))
        adaptive = next(line for line in out.splitlines() if line.strip().startswith("adaptive"))
        assert "60" in full and "GPU-hours" in full and "GPU-hours" in adaptive and "% of the grid" in adaptive
        if search == "adaptive":  # the executor's tasks are those of the first round, not of the whole grid
            assert "search: round 1 would run 6 runs" in out and "executor local: 1 tasks" in out
    assert "with `search: adaptive` in the spec" in out


# ---------------------------------------------------------------------------------------------- real searches

def optima(sweep_dir) -> dict:
    from harness.analysis.select import analyze

    a = analyze(sweep_dir)
    return {(row.group, attr): (getattr(row, attr).cell.lr, getattr(row, attr).low, getattr(row, attr).high)
            for row in a.rows for attr in ("by_metric", "by_loss")}, a


def search(tmp_path, digits, sweep_dir, **kwargs) -> int:
    return main(["sweep", str(spec(tmp_path, digits, **kwargs)), "--sweep-dir", str(sweep_dir), "--max-parallel", "1"])


@pytest.mark.slow
def test_a_real_search_selects_what_the_full_grid_selects_with_fewer_runs(tmp_path, digits_shards, capsys):
    assert search(tmp_path, digits_shards, tmp_path / "grid", search="grid", name="grid") == 0
    assert search(tmp_path, digits_shards, tmp_path / "adaptive") == 0
    full, _ = optima(tmp_path / "grid")
    found, a = optima(tmp_path / "adaptive")
    assert found == full
    record = json.loads((tmp_path / "adaptive" / ".sweep" / "search.json").read_text())
    assert record["done"] and record["grid_runs"] == 60 and record["runs_used"] == a.n_runs <= 30
    assert len(record["skipped"]) == 60 - record["runs_used"] == len(a.skipped)
    assert len(record["rounds"]) >= 2
    assert not any(flag for row in a.rows for flag in row.flags)  # skipped seeds are not missing runs
    from harness.analysis.tables import report

    assert f"skipped by the adaptive search (not missing): {len(a.skipped)} grid points" in report(a)


@pytest.mark.slow
def test_a_search_stopped_between_rounds_resumes_and_runs_nothing_twice(tmp_path, digits_shards, capsys):
    whole = tmp_path / "whole"
    assert search(tmp_path, digits_shards, whole) == 0
    record = json.loads((whole / ".sweep" / "search.json").read_text())
    # The state a stop leaves after round 2 was recorded, before any of its runs ran: rounds 1-2 in the record,
    # the run directories of round 1 only.
    stopped = tmp_path / "stopped"
    shutil.copytree(whole, stopped)
    names = {p.name: p for p in stopped.iterdir() if (p / "config.yaml").exists()}
    by_id = {n.rsplit("-", 1)[-1]: p for n, p in names.items()}
    later = {rid for rnd in record["rounds"][1:] for rid in rnd["runs"]}
    for rid in later:
        shutil.rmtree(by_id[rid])
    history = stopped / ".sweep" / "history.jsonl"
    history.write_text("".join(line + "\n" for line in history.read_text().splitlines()
                               if json.loads(line)["id"] not in later))
    kept = {rid: (by_id[rid] / "result.json").stat().st_mtime_ns for rid in record["rounds"][0]["runs"]}
    partial = {"search": "adaptive", "rounds": record["rounds"][:2]}
    (stopped / ".sweep" / "search.json").write_text(json.dumps(partial))
    capsys.readouterr()
    assert search(tmp_path, digits_shards, stopped) == 0
    out = capsys.readouterr().out
    first = next(line for line in out.splitlines() if " ran " in line)
    assert f"ran {len(record['rounds'][1]['runs'])} runs" in first  # round 2 first, as recorded
    again = json.loads((stopped / ".sweep" / "search.json").read_text())
    assert again["rounds"] == record["rounds"] and again["runs_used"] == record["runs_used"]
    assert {rid: (by_id[rid] / "result.json").stat().st_mtime_ns for rid in kept} == kept  # not run again
    ran = [json.loads(line)["id"] for line in history.read_text().splitlines()]
    assert all(ran.count(rid) == 1 for rid in later) and not set(kept) & set(ran[-len(later):])
    # and once more: nothing left to run
    assert search(tmp_path, digits_shards, stopped) == 0
    assert " ran " not in capsys.readouterr().out


def wait_for_jobs(jobs: list[str], env: dict, deadline: float) -> None:
    while time.time() < deadline:
        queue = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(jobs)], capture_output=True, text=True, env=env)
        if not queue.stdout.strip():
            return
        time.sleep(2)


@pytest.mark.slow
def test_slurm_chains_the_rounds_with_planner_jobs_resumes_after_a_kill_and_ends_with_the_local_table(
        tmp_path, digits_shards, slurm_cluster, capsys):
    sweep_dir, job_env = tmp_path / "slurm", harness_env(OMP_NUM_THREADS=1, SLURM_CONF=slurm_cluster.conf)
    path = spec(tmp_path, digits_shards, extra="slurm: {time: '00:20:00'}", lr="{log2: [-2, 3]}")
    command = ["sweep", path, "--executor", "slurm", "--max-parallel", "4", "--sweep-dir", sweep_dir]
    out = run_harness(*command, env=job_env).stdout
    assert "round 1:" in out and "submitted job array" in out
    arrays = re.findall(r"submitted job array (\d+)", out)
    planner = re.search(r"planner job (\d+) plans round 2 after (\S+) \(afterany\)", out)
    assert planner and planner.group(2) == ",".join(arrays)
    # Kill the search between rounds: cancel the planner; round 1 ends, nothing plans round 2.
    subprocess.run(["scancel", planner.group(1)], check=True, env=job_env)
    deadline = time.time() + 1200
    wait_for_jobs(arrays + [planner.group(1)], job_env, deadline)
    record = json.loads((sweep_dir / ".sweep" / "search.json").read_text())
    assert len(record["rounds"]) == 1 and not record.get("done")
    # The same command resumes: it plans round 2 from round 1's results, and the planner jobs do the rest.
    out = run_harness(*command, env=job_env).stdout
    assert "round 2:" in out and "planner job" in out
    while time.time() < deadline and not json.loads((sweep_dir / ".sweep" / "search.json").read_text()).get("done"):
        time.sleep(2)
    record = json.loads((sweep_dir / ".sweep" / "search.json").read_text())
    logs = "\n".join(p.read_text() for p in (sweep_dir / ".sweep" / "slurm").glob("*.out"))
    assert record.get("done"), logs[-4000:]
    assert len(record["rounds"]) >= 3 and len(record["planners"]) >= 2  # rounds 3.. were planned by planner jobs
    ran = [json.loads(line)["id"] for line in (sweep_dir / ".sweep" / "history.jsonl").read_text().splitlines()]
    assert sorted(ran) == sorted(set(ran)) and len(ran) == record["runs_used"]  # nothing ran twice
    # The same rounds and the same table as the local executor.
    assert search(tmp_path, digits_shards, tmp_path / "local", extra="slurm: {time: '00:20:00'}", lr="{log2: [-2, 3]}") == 0
    local = json.loads((tmp_path / "local" / ".sweep" / "search.json").read_text())
    assert [r["runs"] for r in local["rounds"]] == [r["runs"] for r in record["rounds"]]
    assert optima(sweep_dir)[0] == optima(tmp_path / "local")[0]
    # Run again once it is done: it submits nothing.
    again = run_harness(*command, env=job_env).stdout
    assert "done after" in again and "submitted" not in again


@pytest.mark.slow
def test_sigterm_stops_the_search_and_the_same_command_resumes_it(tmp_path, digits_shards):
    path, sweep_dir = spec(tmp_path, digits_shards), tmp_path / "stopped"
    record = sweep_dir / ".sweep" / "search.json"
    proc = subprocess.Popen([sys.executable, "-m", "harness", "sweep", str(path), "--sweep-dir", str(sweep_dir),
                             "--max-parallel", "1"], cwd=ROOT, env=harness_env(OMP_NUM_THREADS=1),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while proc.poll() is None and not (record.exists() and len(json.loads(record.read_text())["rounds"]) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate()[0]
    # stopped with its checkpoints (130, as any sweep stopped by a signal), or killed while planning
    assert proc.returncode in (0, 130, -signal.SIGTERM), out
    assert not json.loads(record.read_text()).get("done"), out
    assert search(tmp_path, digits_shards, sweep_dir) == 0
    assert search(tmp_path, digits_shards, tmp_path / "whole") == 0
    whole = json.loads((tmp_path / "whole" / ".sweep" / "search.json").read_text())
    again = json.loads(record.read_text())
    assert [r["runs"] for r in again["rounds"]] == [r["runs"] for r in whole["rounds"]]
    finished = [json.loads(line)["id"] for line in (sweep_dir / ".sweep" / "history.jsonl").read_text().splitlines()
                if json.loads(line)["status"] in ("completed", "diverged")]
    assert sorted(finished) == sorted(set(finished)) and len(finished) == whole["runs_used"]  # none ran twice
