"""Running sweeps: locks, resubmission after a kill, two executors at once, TensorBoard HParams, the demo path."""

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from harness.sweep.locks import RunLocks
from tests.conftest import ROOT, harness_env, run_harness, write_config


def tiny_spec(tmp_path, digits, grid, extra="", name="tiny"):
    return write_config(tmp_path / f"{name}.yaml", f"""
name: {name}
base:
  model: {{name: mlp, hidden: [16]}}
  data: {{name: digits, path: {digits}}}
  batch: {{global_batch_size: 32}}
  budget: {{steps: 120}}
  device: cpu
  log: {{every_steps: 20}}
grid:
{grid}
select: {{k: 1, n: 2}}
{extra}
""")


def env():
    # One thread per process: tiny models on a shared 2-core machine slow down badly with more.
    return harness_env(OMP_NUM_THREADS=1)


def results(sweep_dir: Path) -> dict[str, Path]:
    return {p.parent.name: p for p in sweep_dir.glob("*/result.json")}


def history(sweep_dir: Path) -> list[dict]:
    path = sweep_dir / ".sweep" / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------------------------------------- locks


def test_lock_is_exclusive_and_names_its_holder(tmp_path):
    mine, other = RunLocks(tmp_path), RunLocks(tmp_path)
    assert mine.acquire("run1") == (True, None)
    ok, holder = other.acquire("run1")
    assert not ok and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    mine.release("run1")
    assert other.acquire("run1")[0]
    other.release_all()
    assert not list(tmp_path.glob("*.lock"))


def test_stale_locks_are_broken(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "a.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": 0}))
    (tmp_path / "b.lock").write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "since": 0}))
    (tmp_path / "c.lock").write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "since": 0}))
    old = time.time() - 3600
    os.utime(tmp_path / "b.lock", (old, old))  # no heartbeat for an hour: its holder is gone
    locks = RunLocks(tmp_path, stale_after=600)
    assert locks.acquire("a")[0]  # same host, dead pid
    assert locks.acquire("b")[0]  # other host, old heartbeat
    ok, holder = locks.acquire("c")  # other host, fresh heartbeat: alive as far as we can tell
    assert not ok and holder["host"] == "node-elsewhere"
    assert json.loads((tmp_path / "a.lock").read_text())["pid"] == os.getpid()


def test_a_holder_killed_while_writing_its_lock_leaves_no_lock(tmp_path):
    # The lock's content is written to a private file and linked into place: a kill mid-write leaves no empty
    # lock (which, judged by its age only, would block the run for STALE_AFTER_SECONDS).
    script = ("import sys, time, harness.sweep.locks as L\n"
              "def hang(fd): print('writing', flush=True); time.sleep(600)\n"
              "L.os.fsync = hang\n"
              f"L.RunLocks({str(tmp_path)!r}).acquire('r')\n")
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "writing\n"
    child.kill()
    child.wait()
    assert not list(tmp_path.glob("*.lock"))
    assert RunLocks(tmp_path).acquire("r") == (True, None)


def test_a_zombie_or_a_reused_pid_does_not_hold_a_lock(tmp_path):
    host = socket.gethostname()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    while not Path(f"/proc/{zombie.pid}/stat").read_text().split(")")[1].split()[0] == "Z":
        time.sleep(0.01)  # exited, not reaped: os.kill(pid, 0) still succeeds
    (tmp_path / "z.lock").write_text(json.dumps({"host": host, "pid": zombie.pid, "since": time.time()}))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        # the same live pid: started an hour after the lock was written (reused), or before it (the holder)
        (tmp_path / "reused.lock").write_text(json.dumps({"host": host, "pid": live.pid, "since": time.time() - 3600}))
        (tmp_path / "held.lock").write_text(json.dumps({"host": host, "pid": live.pid, "since": time.time() + 1}))
        locks = RunLocks(tmp_path, stale_after=600)
        assert locks.acquire("z")[0] and locks.acquire("reused")[0]
        ok, holder = locks.acquire("held")
        assert not ok and holder["pid"] == live.pid
    finally:
        live.kill()
        live.wait()
        zombie.wait()


def _race(directory, barrier, queue):
    barrier.wait()
    queue.put(RunLocks(Path(directory), stale_after=600).acquire("r")[0])
    barrier.wait()  # the winner lives until all have tried: a holder that exited would leave a stale lock


def test_exactly_one_of_many_executors_takes_a_stale_lock(tmp_path):
    for attempt in range(3):
        (tmp_path / "r.lock").write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "since": 0}))
        os.utime(tmp_path / "r.lock", (0, 0))
        ctx = multiprocessing.get_context("fork")
        barrier, queue = ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(tmp_path), barrier, queue)) for _ in range(8)]
        for p in procs:
            p.start()
        won = [queue.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()
        assert sum(won) == 1, (attempt, won)
        (tmp_path / "r.lock").unlink()


# ---------------------------------------------------------------------------------------------- executors


@pytest.mark.slow
def test_resubmission_after_a_kill_runs_exactly_the_missing_runs(tmp_path, digits_shards):
    spec = tiny_spec(tmp_path, digits_shards, "  optim.effective_lr: [0.05, 0.1, 0.2, 0.4]\n  seed: [0, 1]")
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "harness", "sweep", str(spec), "--sweep-dir", str(sweep_dir), "--no-pack",
           "--max-parallel", "1"]
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, locks = time.time() + 600, sweep_dir / ".sweep" / "locks"
    # kill once 3 runs are finished and the next one is under way (its lock taken; a run takes about 1.5 s)
    while not (len(results(sweep_dir)) >= 3 and list(locks.glob("*.lock"))) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the executor dies mid-run: no clean-up, its lock stays behind
    proc.wait()
    finished = results(sweep_dir)
    assert 3 <= len(finished) < 8, f"the kill came too late ({len(finished)} of 8 finished)"
    stamps = {name: [(p.parent / f).stat().st_mtime_ns for f in ("result.json", "metrics.jsonl", "config.yaml")]
              for name, p in finished.items()}
    assert list(locks.glob("*.lock"))  # the killed run's lock, left behind
    before = len(history(sweep_dir))

    again = run_harness("sweep", spec, "--sweep-dir", sweep_dir, "--no-pack", "--max-parallel", "1", "-v", env=env())
    missing = 8 - len(finished)
    assert f"{len(finished)} finished, 0 running elsewhere, {missing} to run" in again.stdout
    assert f"ran {missing} runs" in again.stdout and f"{missing} completed" in again.stdout
    rerun = [h for h in history(sweep_dir)[before:]]
    assert sorted(h["name"] for h in rerun) == sorted(set(p.parent.name for p in sweep_dir.glob("*/config.yaml")) - set(finished))
    assert len(rerun) == missing and all(h["status"] == "completed" for h in rerun)
    assert len(results(sweep_dir)) == 8
    for name, p in finished.items():  # finished runs untouched
        assert [(p.parent / f).stat().st_mtime_ns for f in ("result.json", "metrics.jsonl", "config.yaml")] == stamps[name]
    assert not list((sweep_dir / ".sweep" / "locks").glob("*.lock"))
    third = run_harness("sweep", spec, "--sweep-dir", sweep_dir, "--no-pack", env=env())
    assert "8 finished, 0 running elsewhere, 0 to run" in third.stdout and len(history(sweep_dir)) == before + missing


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_with_a_checkpoint_and_the_same_command_resumes(tmp_path, digits_shards):
    spec_path = tiny_spec(tmp_path, digits_shards, "  optim.effective_lr: [0.05, 0.1, 0.2]\n  seed: [0]",
                          extra="overrides: {budget.steps: 1500, checkpoint.every_steps: 1000}", name="cc")
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "harness", "sweep", str(spec_path), "--sweep-dir", str(sweep_dir), "--no-pack",
           "--max-parallel", "2"]
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while len(list(sweep_dir.glob("*/metrics.jsonl"))) < 2 and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # Ctrl-C reaches the parent (its workers ignore SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "stopped by SIGINT: 2 runs interrupted, 1 not started; run the same command again" in err
    assert [h["status"] for h in history(sweep_dir)] == ["interrupted", "interrupted"]
    interrupted = [h["name"] for h in history(sweep_dir)]
    for name in interrupted:
        assert list((sweep_dir / name / "checkpoints").glob("step-*.pt")) and not (sweep_dir / name / "result.json").exists()
    assert not list((sweep_dir / ".sweep" / "locks").glob("*.lock"))
    out = run_harness("sweep", spec_path, "--sweep-dir", sweep_dir, "--no-pack", "--max-parallel", "2", env=env()).stdout
    assert "0 finished, 0 running elsewhere, 3 to run" in out and "3 completed" in out
    for name in interrupted:  # resumed from the stop's checkpoint: two segments
        result = json.loads((sweep_dir / name / "result.json").read_text())
        assert result["steps"] == 1500 and len(result["segments"]) == 2


@pytest.mark.slow
def test_failed_runs_are_recorded_and_run_again(tmp_path, digits_shards):
    # A manifest without its shards: the sweep's up-front data check (a missing data path is one line, exit 4,
    # tests/test_hostile_inputs.py) reads only the manifest, so each run fails on its own, as a run can.
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(digits_shards / "manifest.json", broken)
    spec = tiny_spec(tmp_path, broken, "  optim.effective_lr: [0.1, 0.2]")
    sweep_dir = tmp_path / "sweep"
    proc = run_harness("sweep", spec, "--sweep-dir", sweep_dir, "--no-pack", check=False, env=env())
    assert proc.returncode == 7 and "2 runs failed" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    errors = list(sweep_dir.glob("*/error.txt"))
    assert len(errors) == 2 and "DataError" in errors[0].read_text()
    assert [h["status"] for h in history(sweep_dir)] == ["failed", "failed"]
    shutil.rmtree(broken)
    broken.symlink_to(digits_shards)  # fix the cause; the same command runs exactly the failed runs
    out = run_harness("sweep", spec, "--sweep-dir", sweep_dir, "--no-pack", env=env()).stdout
    assert "0 finished, 0 running elsewhere, 2 to run" in out and "2 completed" in out
    assert not list(sweep_dir.glob("*/error.txt")) and len(results(sweep_dir)) == 2


@pytest.mark.slow
def test_two_executors_on_one_sweep_never_run_the_same_run(tmp_path, digits_shards):
    spec = tiny_spec(tmp_path, digits_shards, "  optim.effective_lr: [0.05, 0.1, 0.2]\n  seed: [0, 1]")
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "harness", "sweep", str(spec), "--sweep-dir", str(sweep_dir), "--no-pack",
           "--max-parallel", "1"]
    procs = [subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    runs = [h["id"] for h in history(sweep_dir)]
    assert len(runs) == len(set(runs)) == 6  # every run trained exactly once, by one executor or the other
    assert len(results(sweep_dir)) == 6


@pytest.mark.slow
def test_packed_sweep_is_one_tensorboard_logdir_with_hparams(tmp_path, digits_shards):
    spec = tiny_spec(tmp_path, digits_shards, "  optim.name: [sgd, momentum]\n  optim.effective_lr: [0.1, 0.4, 1000.0]\n"
                     "  seed: [0, 1]", extra="overrides: {divergence.max_loss: 10.0}")
    sweep_dir = tmp_path / "sweep"
    out = run_harness("sweep", spec, "--sweep-dir", sweep_dir, "--max-parallel", "1", env=env()).stdout
    assert "12 to run (1 tasks, 1 of them packs)" in out and "8 completed, 4 diverged, 0 failed" in out
    assert all(json.loads(p.read_text())["packed_runs"] == 12 for p in results(sweep_dir).values())
    again = run_harness("sweep", spec, "--sweep-dir", sweep_dir, env=env()).stdout
    assert "12 finished, 0 running elsewhere, 0 to run" in again  # a diverged run is a result: never retried
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep_dir), "--host", "127.0.0.1",
                           "--port", str(port), "--reload_interval", "1"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, env=harness_env())
    base = f"http://127.0.0.1:{port}"
    try:
        runs, deadline = [], time.time() + 300
        while time.time() < deadline and len(runs) < 13:
            try:
                runs = json.loads(urllib.request.urlopen(f"{base}/data/runs", timeout=5).read())
            except OSError:
                pass
            time.sleep(1)
        # One run per run directory plus the sweep's own experiment summary: no add_hparams sub-runs.
        assert sorted(runs) == sorted(["."] + [f"{name}/tb" for name in results(sweep_dir)])

        def post(path, body):
            request = urllib.request.Request(f"{base}/data/plugin/hparams/{path}", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            return json.loads(urllib.request.urlopen(request, timeout=30).read())

        experiment = post("experiment", {"experimentName": ""})
        hparams = {h["name"]: h for h in experiment["hparamInfos"]}
        assert {"optim.name", "optim.effective_lr", "seed", "batch.global_batch_size"} <= set(hparams)
        assert hparams["optim.effective_lr"]["domainDiscrete"] == [0.1, 0.4, 1000.0]
        assert {m["name"]["tag"] for m in experiment["metricInfos"]} >= {"final/test_accuracy", "final/train_loss"}
        groups = post("session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 100,
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": [{"hparam": "optim.effective_lr", "includeInResult": True},
                          {"hparam": "optim.name", "includeInResult": True},
                          {"metric": {"tag": "final/test_accuracy", "group": ""}, "includeInResult": True}]})
        assert groups["totalSize"] == 12
        for group in groups["sessionGroups"]:
            result = json.loads((sweep_dir / group["name"].rsplit("/", 1)[0] / "result.json").read_text())
            (session,) = group["sessions"]
            accs = [m["value"] for m in group["metricValues"] if m["name"]["tag"] == "final/test_accuracy"]
            if result["status"] == "diverged":
                assert session["status"] == "STATUS_FAILURE" and group["hparams"]["optim.effective_lr"] == 1000.0
                assert not accs
            else:
                assert session["status"] == "STATUS_SUCCESS" and accs[0] == pytest.approx(result["test_accuracy"], rel=1e-6)
            assert group["hparams"]["optim.name"] in ("sgd", "momentum")
    finally:
        tb.terminate()
        tb.wait(timeout=60)


@pytest.mark.slow
def test_demo_command_runs_the_study_path_end_to_end(tmp_path, digits_shards):
    spec = tiny_spec(tmp_path, digits_shards, "  optim.name: [sgd, momentum]\n  batch.global_batch_size: [16, 64]\n"
                     "  optim.effective_lr: {log2: [-3, -1], slide: {axis: batch.global_batch_size, ref: 16, max: 1}}\n"
                     "  seed: [0, 1]", extra="description: a tiny demo\nbudget_rule: constant_steps")
    sweep_dir = tmp_path / "demo"
    out = run_harness("demo", "--spec", spec, "--data", digits_shards, "--sweep-dir", sweep_dir, env=env()).stdout
    assert "ran 24 runs" in out and "| Optimizer | Batch size | Runs |" in out
    assert f"tensorboard --logdir {sweep_dir}" in out
    assert (sweep_dir / "analysis" / "batch_size.png").is_file() and (sweep_dir / "analysis" / "table.csv").is_file()
    assert len(results(sweep_dir)) == 24


def test_local_workers_take_one_device_each(monkeypatch):
    """Worker k of the local pool trains on GPU k mod (visible GPUs), not all on cuda:0."""
    import multiprocessing

    from harness.sweep.local import assign_device

    counter = multiprocessing.get_context("spawn").Value("i", 0)
    seen = []
    for _ in range(5):
        monkeypatch.delenv("LOCAL_RANK", raising=False)
        assign_device(counter, 4)
        seen.append(os.environ["LOCAL_RANK"])
    assert seen == ["0", "1", "2", "3", "0"]
    assign_device(counter, 0)  # no GPU: the CPU, LOCAL_RANK 0
    assert os.environ["LOCAL_RANK"] == "0"


@pytest.mark.slow
def test_ghost_bn_demo_runs_a_tiny_version_of_its_study(tmp_path, mnist1d_shards):
    """`harness demo --study ghost-bn` end to end on yaml/demo_ghost_bn.yaml made tiny (its base config, ghost
    groups, one block and window per optimizer; B = 32 and 128, 2 learning rates each, an 8-channel convnet,
    2 epochs of 512 held-out examples): the sweep, the analysis and the figures of the real study."""
    import yaml

    spec = yaml.safe_load((ROOT / "yaml" / "demo_ghost_bn.yaml").read_text())
    spec["base"] = str(ROOT / "yaml" / spec["base"])
    spec["overrides"].update({"model.channels": [8, 8, 8], "data.train_examples": 512, "budget.epochs": 2,
                              "log.every_steps": 4})
    for block in spec["grid"]:
        block["batch.global_batch_size"] = [32, 128]
        lo = block["optim.effective_lr"]["log2"][0]
        block["optim.effective_lr"]["log2"] = [lo + 2, lo + 3]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    sweep_dir = tmp_path / "demo"
    out = run_harness("demo", "--study", "ghost-bn", "--spec", path, "--data", mnist1d_shards, "--sweep-dir", sweep_dir,
                      env=env()).stdout
    assert "ran 8 runs" in out and "8 completed" in out and "| Optimizer | Batch size | Runs |" in out
    for optimizer in ("sgd", "momentum"):
        assert all(f"| {optimizer} | {b} | 1 |" in out for b in (32, 128)), out  # 1 seed per cell
    assert (sweep_dir / "analysis" / "batch_size.png").is_file() and (sweep_dir / "analysis" / "table.csv").is_file()
    found = results(sweep_dir)
    assert len(found) == 8
    for result_path in found.values():
        result = json.loads(result_path.read_text())
        assert result["status"] == "completed" and result["layout"]["ghost_batch_size"] == 32
        assert result["epochs"] == 2.0 and result["parameters"] == 40 + 2 * 192 + 3 * 16 + 80 * 10 + 10  # convs, BN, head
