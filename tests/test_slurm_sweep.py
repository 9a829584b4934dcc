"""The SLURM executor: a job array with a throttle through slurm/sweep_array.sh, on a real SLURM cluster.

The cluster is the launch issue's session fixture `slurm_cluster` (tests/slurm_cluster.py: munged, slurmctld
and two slurmd on this machine; `.conf` is its slurm.conf).
The array script itself also runs here without SLURM, as bash with the variables SLURM would set.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, harness_env, run_harness, write_config

SCRIPT = ROOT / "slurm" / "sweep_array.sh"


def spec(tmp_path, digits, extra="", lrs="[0.1, 0.2]", steps=30, name="slurmy"):
    return write_config(tmp_path / f"{name}.yaml", f"""
name: {name}
base:
  model: {{name: mlp, hidden: [16]}}
  data: {{name: digits, path: {digits}}}
  budget: {{steps: {steps}}}
  device: cpu
  log: {{every_steps: 10}}
grid:
  batch.global_batch_size: [16, 32]
  optim.effective_lr: {lrs}
  seed: [0, 1]
select: {{k: 1, n: 2}}
{extra}
""")


def env(**extra):
    return harness_env(OMP_NUM_THREADS=1, **extra)


def test_dry_run_shows_the_array_and_its_throttle(tmp_path, digits_shards):
    out = run_harness("sweep", spec(tmp_path, digits_shards), "--executor", "slurm", "--dry-run", "--max-parallel", "3",
                      "--sweep-dir", tmp_path / "sw").stdout
    assert "8 runs" in out and "executor slurm: 2 array tasks, at most 3 at once (sbatch --array=0-1%3" in out
    out = run_harness("sweep", spec(tmp_path, digits_shards, "slurm: {runs_per_task: 3}"), "--executor", "slurm",
                      "--dry-run", "--no-pack", "--sweep-dir", tmp_path / "sw").stdout
    assert "executor slurm: 3 array tasks, at most 16 at once (sbatch --array=0-2%16" in out  # 8 runs, 3 per task


def test_runs_of_several_processes_get_nodes_and_go_through_the_launch_entry(tmp_path, digits_shards):
    from harness.sweep.slurm import launch_settings, sbatch_command
    from harness.sweep.spec import load_spec

    path = spec(tmp_path, digits_shards, "slurm: {nodes: 2, gpus_per_node: 4, runs_per_task: 3}")
    out = run_harness("sweep", path, "--executor", "slurm", "--dry-run", "--sweep-dir", tmp_path / "sw").stdout
    # Never packed: 8 runs, 3 per task; each run on 2 nodes x 4 processes.
    assert ("executor slurm: 3 array tasks, at most 16 at once (sbatch --array=0-2%16 slurm/sweep_array.sh ...); "
            "each run on 2 node(s), 4 GPU(s) each, 4 (one per GPU) process(es) per node, through python -m launch") in out
    slurm = load_spec(path).spec.slurm
    assert launch_settings(slurm) == {"nproc_per_node": None}
    cmd = sbatch_command("s", tmp_path / "sw", tmp_path / "t.json", 3, 16, slurm, wait=False)
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--gpus-per-node=4"} <= set(cmd)
    single = load_spec(spec(tmp_path, digits_shards, "slurm: {gpus_per_task: 1}")).spec.slurm
    assert launch_settings(single) is None
    assert not any(c.startswith(("--nodes", "--gpus-per-node")) for c in
                   sbatch_command("s", tmp_path / "sw", tmp_path / "t.json", 3, 16, single, wait=False))


@pytest.mark.slow
def test_a_launched_run_gets_the_tasks_sigusr1_checkpoints_and_resumes(tmp_path, digits_shards):
    """Outside SLURM, a task whose runs go through `python -m launch` (torchrun, 2 processes): SIGUSR1 to the
    task reaches the run (RUN_DIR/STOP), which checkpoints; the task ends with it interrupted (not failed), so
    the next submission resumes it from that checkpoint (the resume itself: tests/test_slurm.py)."""
    from harness.sweep.slurm import write_task_file
    from harness.sweep.spec import load_spec
    from harness.sweep.state import prepare
    from harness.sweep.tasks import group_tasks as plan_tasks

    path = write_config(tmp_path / "long.yaml", f"""
name: long
base:
  model: {{name: mlp, hidden: [64]}}
  data: {{name: digits, path: {digits_shards}}}
  budget: {{steps: 300}}
  device: cpu
  log: {{every_steps: 20}}
  checkpoint: {{every_steps: 100}}
grid: {{batch.global_batch_size: [32], optim.effective_lr: [0.05], seed: [0]}}
select: {{k: 1, n: 1}}
slurm: {{nproc_per_node: 2}}
""")
    sweep_dir = tmp_path / "sw"
    entries = prepare(load_spec(path), sweep_dir)
    task_file = write_task_file(sweep_dir, plan_tasks(entries, False, 128, 1), False, {"nproc_per_node": 2})
    run_dir = sweep_dir / entries[0]["name"]
    cmd = [sys.executable, "-m", "harness", "sweep-task", str(task_file), "0"]
    task = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.2)
    task.send_signal(signal.SIGUSR1)
    out, err = task.communicate(timeout=300)
    assert task.returncode == 0 and "sweep-task: 1 interrupted" in out, err[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "launch: SIGUSR1: wrote" in log and "checkpoint saved at step" in log
    assert not (run_dir / "result.json").exists() and not (run_dir / "STOP").exists()
    assert list((run_dir / "checkpoints").glob("step-*"))
    history = [json.loads(line) for line in (sweep_dir / ".sweep" / "history.jsonl").read_text().splitlines()]
    assert [h["status"] for h in history] == ["interrupted"]  # a resubmission resumes it (harness/trainer.py)


def test_without_sbatch_the_slurm_executor_says_so(tmp_path, digits_shards):
    proc = run_harness("sweep", spec(tmp_path, digits_shards), "--executor", "slurm", "--sweep-dir", tmp_path / "sw",
                       env=env(PATH=os.path.dirname(sys.executable)), check=False)
    assert proc.returncode == 5 and "sbatch not found" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_array_script_runs_its_tasks_as_slurm_would(tmp_path, digits_shards):
    from harness.sweep.slurm import write_task_file
    from harness.sweep.spec import load_spec
    from harness.sweep.state import prepare
    from harness.sweep.tasks import group_tasks as plan_tasks

    sweep_dir = tmp_path / "sw"
    entries = prepare(load_spec(spec(tmp_path, digits_shards)), sweep_dir)
    tasks = plan_tasks(entries, True, 128, 1)
    task_file = write_task_file(sweep_dir, tasks, True)
    assert [len(t) for t in tasks] == [4, 4]  # one pack per batch size
    bare = subprocess.run(["bash", str(SCRIPT), str(task_file)], capture_output=True, text=True, env=env())
    assert bare.returncode != 0 and "runs as one task of a SLURM job array" in bare.stderr
    for index in range(len(tasks)):
        proc = subprocess.run(["bash", str(SCRIPT), str(task_file)], capture_output=True, text=True, timeout=600,
                              env=env(SLURM_ARRAY_TASK_ID=index, SLURM_ARRAY_JOB_ID=77, HARNESS_PYTHON=sys.executable,
                                      HARNESS_ROOT=ROOT))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "sweep-task: 4 completed" in proc.stdout
    results = [json.loads(p.read_text()) for p in sweep_dir.glob("*/result.json")]
    assert len(results) == 8 and all(r["status"] == "completed" for r in results)
    envs = [json.loads(p.read_text()) for p in sweep_dir.glob("*/env.json")]
    assert {e["slurm"]["array_task_id"] for e in envs} == {"0", "1"}


@pytest.mark.slow
def test_slurm_executor_completes_a_sweep_on_a_real_cluster(tmp_path, digits_shards, slurm_cluster):
    sweep_dir = tmp_path / "sw"
    path = spec(tmp_path, digits_shards, "slurm: {time: '00:20:00', runs_per_task: 2}")
    job_env = env(SLURM_CONF=slurm_cluster.conf)
    # Two packs: two array tasks, one at a time (%1).
    out = run_harness("sweep", path, "--executor", "slurm", "--max-parallel", "1", "--sweep-dir", sweep_dir,
                      env=job_env).stdout
    assert "--array=0-1%1" in out and "slurm/sweep_array.sh" in out
    job = re.search(r"submitted job array (\d+)", out).group(1)
    # Submitting again while the array is queued or running submits nothing: its runs are running or queued.
    again = run_harness("sweep", path, "--executor", "slurm", "--sweep-dir", sweep_dir, env=job_env).stdout
    assert "0 to run" in again and "submitted" not in again
    deadline = time.time() + 1200
    while time.time() < deadline:
        queue = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%i"], capture_output=True, text=True, env=job_env)
        if not queue.stdout.strip():
            break
        time.sleep(2)
    results = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/result.json")}
    logs = "\n".join(p.read_text() for p in (sweep_dir / ".sweep" / "slurm").glob("*.out"))
    assert len(results) == 8 and all(r["status"] == "completed" for r in results.values()), logs[-4000:]
    envs = [json.loads(p.read_text()) for p in sweep_dir.glob("*/env.json")]
    assert {e["slurm"]["array_job_id"] for e in envs} == {job} and {e["slurm"]["array_task_id"] for e in envs} == {"0", "1"}
    again = run_harness("sweep", path, "--executor", "slurm", "--sweep-dir", sweep_dir, env=job_env).stdout
    assert "8 finished, 0 running, 0 queued in earlier arrays, 0 to run" in again and "submitted" not in again
    # Unpacked, 2 runs per task, after removing three results: exactly those three run again, in 2 tasks;
    # --wait returns when the array has ended.
    for p in sorted(sweep_dir.glob("*/result.json"))[:3]:
        p.unlink()
    out = run_harness("sweep", path, "--executor", "slurm", "--no-pack", "--wait", "--sweep-dir", sweep_dir,
                      env=job_env, timeout=1200).stdout
    assert "5 finished, 0 running, 0 queued in earlier arrays, 3 to run" in out and "--array=0-1%16" in out
    assert len(list(sweep_dir.glob("*/result.json"))) == 8


@pytest.mark.slow
def test_slurm_executor_runs_each_run_across_two_nodes(tmp_path, digits_shards, slurm_cluster):
    """`slurm: {nodes: 2}`: each array task has two nodes, and each of its runs is one torchrun world across
    both (srun through the launch entry), one run after another in the same task."""
    sweep_dir = tmp_path / "sw"
    path = write_config(tmp_path / "two.yaml", f"""
name: twonode
base:
  model: {{name: mlp, hidden: [16]}}
  data: {{name: digits, path: {digits_shards}}}
  budget: {{steps: 20}}
  device: cpu
  log: {{every_steps: 10}}
grid: {{batch.global_batch_size: [32], optim.effective_lr: [0.1, 0.2], seed: [0]}}
select: {{k: 1, n: 1}}
slurm: {{time: '00:20:00', nodes: 2, gpus_per_node: 1, runs_per_task: 2}}
""")
    out = run_harness("sweep", path, "--executor", "slurm", "--wait", "--sweep-dir", sweep_dir,
                      env=env(SLURM_CONF=slurm_cluster.conf), timeout=900).stdout
    assert "--nodes=2" in out and "--array=0-0%16" in out and "through python -m launch" in out
    results = [json.loads(p.read_text()) for p in sweep_dir.glob("*/result.json")]
    logs = "\n".join(p.read_text() for p in sweep_dir.glob("*/train.log"))
    assert len(results) == 2 and all(r["status"] == "completed" for r in results), logs[-4000:]
    assert all(r["layout"]["world_size"] == 2 and r["segments"][0]["nnodes"] == "2" for r in results)
    task_job = results[0]["segments"][0]["job_id"]
    assert {r["segments"][0]["job_id"] for r in results} == {task_job}  # one array task, both runs
    for step in ("0", "1"):  # each run: one srun step with a torchrun on each node
        assert slurm_cluster.step_nodes(task_job, step) == {"node1", "node2"}


@pytest.mark.slow
def test_a_sweep_beyond_max_array_size_is_split_into_several_arrays(tmp_path, digits_shards):
    """A cluster with MaxArraySize=2 (indices 0..1) and a sweep of 4 unpacked runs: 2 arrays (2, 2), each
    recorded; a resubmission while they are queued submits nothing; after removing results, --wait waits for
    every array it submits; in the end a resubmission runs nothing."""
    from tests.slurm_cluster import SlurmCluster

    path = spec(tmp_path, digits_shards, "slurm: {time: '00:20:00'}", lrs="[0.1]", steps=20, name="split")
    sweep_dir = tmp_path / "sw"
    args = ("sweep", path, "--executor", "slurm", "--no-pack", "--max-parallel", "2", "--sweep-dir", sweep_dir)
    with SlurmCluster(nodes=1, config={"MaxArraySize": 2}) as cluster:
        job_env = env(SLURM_CONF=cluster.conf)
        # sbatch itself refuses one array of 12 here: what the executor used to submit.
        one = cluster.run("sbatch", "--array=0-11", "--wrap", "true", check=False)
        assert one.returncode != 0 and "Invalid job array specification" in one.stderr
        dry = run_harness(*args, "--dry-run", env=job_env).stdout
        assert "executor slurm: 4 array tasks, at most 2 at once (sbatch --array=0-1%2; sbatch --array=0-1%2 " \
               "slurm/sweep_array.sh ...)" in dry, dry
        assert "arrays: 2 arrays of 2, 2 tasks (MaxArraySize = 2: at most 2 tasks per array" in dry, dry
        out = run_harness(*args, env=job_env).stdout
        jobs = re.findall(r"submitted job array (\d+)", out)
        assert len(jobs) == 2 and f"--dependency=afterany:{jobs[0]}" in out
        record = [json.loads(line) for line in (sweep_dir / ".sweep" / "slurm" / "submitted.jsonl").read_text().splitlines()]
        assert [r["job"] for r in record] == jobs and len({r["task_file"] for r in record}) == 2
        again = run_harness(*args, env=job_env).stdout  # every run is queued (or running) in one of the arrays
        assert "0 to run" in again and "submitted" not in again
        for job in jobs:
            cluster.wait(job, timeout=900)
        results = [json.loads(p.read_text()) for p in sweep_dir.glob("*/result.json")]
        logs = "\n".join(p.read_text() for p in (sweep_dir / ".sweep" / "slurm").glob("*.out"))
        assert len(results) == 4 and all(r["status"] == "completed" for r in results), logs[-4000:]
        envs = [json.loads(p.read_text()) for p in sweep_dir.glob("*/env.json")]
        assert {e["slurm"]["array_job_id"] for e in envs} == set(jobs)
        assert max(int(e["slurm"]["array_task_id"]) for e in envs) == 1  # MaxArraySize - 1
        # Three results removed: 2 arrays (2 + 1); --wait returns when both have ended.
        for p in sorted(sweep_dir.glob("*/result.json"))[:3]:
            p.unlink()
        out = run_harness(*args, "--wait", env=job_env, timeout=900).stdout
        assert "1 finished, 0 running, 0 queued in earlier arrays, 3 to run" in out
        assert len(re.findall(r"submitted job array (\d+)", out)) == 2 and "waiting for 2 job array(s)" in out
        assert len(list(sweep_dir.glob("*/result.json"))) == 4  # --wait returned after both arrays
        final = run_harness(*args, env=job_env).stdout
        assert "4 finished, 0 running, 0 queued in earlier arrays, 0 to run" in final and "submitted" not in final
