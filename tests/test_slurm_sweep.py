"""The SLURM executor: a job array with a throttle through slurm/sweep_array.sh, on a real SLURM cluster.

The cluster is the launch issue's session fixture `slurm_cluster` (tests/slurm_cluster.py: munged, slurmctld
and two slurmd on this machine; `.conf` is its slurm.conf). Without that fixture the cluster test is skipped.
The array script itself also runs here without SLURM, as bash with the variables SLURM would set.
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, harness_env, run_harness, write_config

SCRIPT = ROOT / "slurm" / "sweep_array.sh"


def spec(tmp_path, digits, extra=""):
    return write_config(tmp_path / "s.yaml", f"""
name: slurmy
base:
  model: {{name: mlp, hidden: [16]}}
  data: {{name: digits, path: {digits}}}
  budget: {{steps: 30}}
  device: cpu
  log: {{every_steps: 10}}
grid:
  batch.global_batch_size: [16, 32]
  optim.effective_lr: [0.1, 0.2]
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


def test_without_sbatch_the_slurm_executor_says_so(tmp_path, digits_shards):
    proc = run_harness("sweep", spec(tmp_path, digits_shards), "--executor", "slurm", "--sweep-dir", tmp_path / "sw",
                       env=env(PATH=os.path.dirname(sys.executable)), check=False)
    assert proc.returncode == 5 and "sbatch not found" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_array_script_runs_its_tasks_as_slurm_would(tmp_path, digits_shards):
    from harness.executor import plan_tasks, prepare, write_task_file
    from harness.sweep import load_spec

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


@pytest.fixture
def cluster(request):
    try:
        return request.getfixturevalue("slurm_cluster")
    except pytest.FixtureLookupError:
        pytest.skip("needs the slurm_cluster fixture (tests/slurm_cluster.py, from the launch issue) on this branch")


@pytest.mark.slow
def test_slurm_executor_completes_a_sweep_on_a_real_cluster(tmp_path, digits_shards, cluster):
    sweep_dir = tmp_path / "sw"
    path = spec(tmp_path, digits_shards, "slurm: {time: '00:20:00', runs_per_task: 2}")
    job_env = env(SLURM_CONF=cluster.conf)
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
