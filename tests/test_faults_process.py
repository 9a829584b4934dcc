"""Process faults: a second writer on a run dir, a SIGKILLed sweep executor, Ctrl-C, a stale STOP file, a frozen
rank. Real processes and launchers (torchrun, the spawn-mode sweep pool), a tiny MLP on digits in fp64."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.core.errors import RunDirInUse
from harness.core.lockfile import RunDirLock
from harness.train.signals import StopRequest
from tests.conftest import ROOT, final_state, harness_env, run_harness, torchrun, write_config
from tests.test_fault_tolerance import bitwise_equal, children, logged_step, wait_for

CONFIG = """
seed: 3
precision: fp64
device: cpu
model: {{name: mlp, hidden: [16]}}
data: {{name: digits, path: {shards}}}
batch: {{global_batch_size: 32}}
optim: {{name: momentum, effective_lr: 0.5}}
budget: {{steps: {steps}}}
checkpoint: {{every_steps: 1000, every_minutes: null, keep: 2}}
log: {{every_steps: 1, progress: false, tensorboard: false}}
{extra}
"""


def config(tmp_path, shards, steps=3000, extra="", name="p.yaml") -> Path:
    return write_config(tmp_path / name, CONFIG.format(shards=shards, steps=steps, extra=extra))


def env(**extra) -> dict:
    return harness_env(OMP_NUM_THREADS=1, **extra)


def start(*args, session=False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *map(str, args)], env=env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=session)


def logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip() and "loss" in json.loads(line)]


def harness_lines(text: str, start: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(start)]


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# ---------------------------------------------------------------------------------------------- one writer


@pytest.mark.slow
@pytest.mark.parametrize("second", ["harness train", "torchrun 2 ranks"])
def test_second_writer_on_a_run_dir_is_refused(tmp_path, digits_shards, capsys, second):
    cfg, run = config(tmp_path, digits_shards, steps=20000), tmp_path / "run"
    first = start("-m", "harness", "train", cfg, "--run-dir", run)
    try:
        wait_for(lambda: logged_step(run) >= 1 or first.poll() is not None, what="the first writer's step 1")
        if second == "harness train":
            with pytest.raises(SystemExit) as exit_:
                main(["train", str(cfg), "--run-dir", str(run)])
            code, err = exit_.value.code, capsys.readouterr().err
        else:
            proc = torchrun(2, "train", cfg, "--run-dir", run, check=False)
            code, err = proc.returncode, proc.stderr
        assert first.poll() is None, "the first writer should still be training"
        (run / "STOP").touch()  # the first writer stops at its next step, with a checkpoint
        out, first_err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, first_err
    assert code != 0 and (code == 9 if second == "harness train" else "exitcode  : 9" in err), err[-3000:]
    refused = harness_lines(err, "harness: error: run dir")
    assert len(refused) == 1 and f"in use by pid {first.pid} on " in refused[0] and "another --run-dir" in refused[0]
    steps = logged_steps(run)
    assert steps == list(range(1, len(steps) + 1))  # one writer: every step once, in order


HOLDER = """
import sys
from pathlib import Path
from harness.core.lockfile import RunDirLock
RunDirLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
sys.stdin.read()  # hold until the test closes our stdin
"""


def test_a_requeued_job_waits_for_its_predecessors_lock_and_another_job_does_not(tmp_path, monkeypatch):
    """A requeue or elastic restart of the same job may start before its predecessor is gone (or, on NFS, before
    the server drops a crashed node's lock): it waits. Another job is refused at once, told who holds the dir."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=env(SLURM_JOB_ID=77), cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        monkeypatch.setenv("SLURM_JOB_ID", "78")
        with pytest.raises(RunDirInUse, match=f"in use by pid {holder.pid} on .*, SLURM job 77"):
            RunDirLock(tmp_path).acquire()
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        threading.Timer(1.0, holder.stdin.close).start()  # the predecessor exits while we wait
        lock = RunDirLock(tmp_path)
        lock.acquire()
        assert lock.held and json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------------------------- sweep workers


@pytest.mark.slow
def test_sigkilled_sweep_leaves_no_worker_and_the_rerun_completes_every_run_once(tmp_path, digits_shards):
    spec = write_config(tmp_path / "s.yaml", f"""
name: orphan
base:
  model: {{name: mlp, hidden: [16]}}
  data: {{name: digits, path: {digits_shards}}}
  batch: {{global_batch_size: 32}}
  budget: {{steps: 1200}}
  checkpoint: {{every_steps: 120}}
  device: cpu
  log: {{every_steps: 20}}
grid:
  optim.effective_lr: [0.05, 0.1, 0.2, 0.4]
select: {{k: 1, n: 2}}
""")
    sweep_dir = tmp_path / "sweep"
    args = ["sweep", spec, "--sweep-dir", sweep_dir, "--no-pack", "--max-parallel", "2"]
    proc = start("-m", "harness", *args, session=True)
    try:
        wait_for(lambda: len(list(sweep_dir.glob("*/metrics.jsonl"))) >= 2 or proc.poll() is not None,
                 what="two runs training")
        workers = descendants(proc.pid)
        assert proc.poll() is None and len(workers) >= 2, workers
        os.kill(proc.pid, signal.SIGKILL)  # the executor alone: its workers are not told
        proc.wait()
        deadline = time.time() + 10
        while any(alive(p) for p in workers) and time.time() < deadline:
            time.sleep(0.2)
        survivors = [p for p in workers if alive(p)]
    finally:
        for pid in descendants(proc.pid) + workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not survivors, f"workers outlived their executor: {survivors}"
    done = len(list(sweep_dir.glob("*/result.json")))
    again = run_harness(*args, env=env())
    assert f"{done} finished, 0 running elsewhere, {4 - done} to run" in again.stdout, again.stdout  # none held
    assert f"{4 - done} completed" in again.stdout
    results = [json.loads(p.read_text()) for p in sweep_dir.glob("*/result.json")]
    assert len(results) == 4 and all(r["status"] == "completed" for r in results)
    history = [json.loads(line) for line in (sweep_dir / ".sweep" / "history.jsonl").read_text().splitlines()]
    completed = [h["name"] for h in history if h["status"] == "completed"]
    assert sorted(completed) == sorted(set(completed)) and len(completed) == 4  # every run once


# ---------------------------------------------------------------------------------------------- Ctrl-C


def test_a_second_ctrl_c_stops_at_once_but_the_terminals_copy_of_the_first_does_not(tmp_path, monkeypatch):
    """Under torchrun one Ctrl-C arrives twice (the terminal's and the agent's forwarded SIGINT)."""
    stop = StopRequest(tmp_path, time.time())
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C, forwarded
        assert stop.requested() and stop.interrupted and stop.signal_name == "SIGINT"
        monkeypatch.setattr("harness.train.signals.DUPLICATE_SIGINT_SECONDS", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_ctrl_c_checkpoints_exits_130_and_resumes_bitwise(tmp_path, digits_shards, ranks):
    # 600 steps: the Ctrl-C lands at step 50 or soon after, far from the end (each step takes milliseconds), and the
    # reference and the resumed run are not longer than they need be (they trained 1500 steps before).
    cfg, run, ref = config(tmp_path, digits_shards, steps=600), tmp_path / "run", tmp_path / "ref"
    if ranks == 1:
        run_harness("train", cfg, "--run-dir", ref, env=env())
        proc = start("-m", "harness", "train", cfg, "--run-dir", run, session=True)
    else:
        torchrun(2, "train", cfg, "--run-dir", ref)
        proc = start("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "harness", "train",
                     cfg, "--run-dir", run, session=True)
    try:
        wait_for(lambda: logged_step(run) >= 50 or proc.poll() is not None, what="step 50")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground process group
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    if ranks == 1:
        assert proc.returncode == 130, err
    else:  # torchrun's agent forwards the SIGINT to its workers, waits for them, then re-raises it (exit 1)
        assert "Received 2 death signal" in err and proc.returncode == 1, err[-4000:]
    lines = harness_lines(err, "harness: interrupted at step ")
    assert len(lines) == 1, err[-4000:]
    assert "checkpoint saved to " in lines[0] and lines[0].endswith("; rerun the same command to resume")
    saved = Path(lines[0].split("checkpoint saved to ")[1].split(";")[0])
    assert saved.exists() and not (run / "result.json").exists()
    # No traceback from the harness (torchrun's agent prints its own SignalException's and exits 1).
    assert not [line for line in err.splitlines() if 'File "' in line and str(ROOT / "harness") in line], err[-4000:]
    if ranks == 1:
        resumed = run_harness("train", cfg, "--run-dir", run, env=env())
    else:
        resumed = torchrun(2, "train", cfg, "--run-dir", run)
    assert f"resumed from {saved}" in resumed.stdout
    assert bitwise_equal(final_state(run), final_state(ref))


# ---------------------------------------------------------------------------------------------- STOP file


def test_stale_stop_file_is_ignored_with_one_line(tmp_path, digits_shards, capsys):
    cfg, run = config(tmp_path, digits_shards, steps=200), tmp_path / "run"
    run.mkdir()
    (run / "STOP").touch()
    old = time.time() - 3600
    os.utime(run / "STOP", (old, old))  # left by a process killed an hour ago
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(cfg), "--run-dir", str(run)])
    assert exit_.value.code == 0
    notes = harness_lines(capsys.readouterr().out, "harness: ignoring the STOP file")
    assert len(notes) == 1 and "before this run started" in notes[0]
    assert json.loads((run / "result.json").read_text())["status"] == "completed" and not (run / "STOP").exists()


# ---------------------------------------------------------------------------------------------- frozen rank


@pytest.mark.slow
@pytest.mark.parametrize("ends_by", ["collective timeout", "STOP file"])
def test_frozen_rank_is_detected_and_the_job_ends_with_one_line(tmp_path, digits_shards, ends_by):
    """SIGSTOP one rank of two: the collective timeout (6 s here) ends the job with one line, or, with a long
    timeout, the STOP file still acts while the other rank waits."""
    timeout = 0.1 if ends_by == "collective timeout" else 10.0
    cfg = config(tmp_path, digits_shards, steps=200000, extra=f"distributed: {{timeout_minutes: {timeout}}}")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "harness",
           "train", str(cfg), "--run-dir", str(run)]
    proc = subprocess.Popen(cmd, env=env(TORCH_ELASTIC_SHUTDOWN_TIMEOUT=2), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    workers = []
    try:
        wait_for(lambda: logged_step(run) >= 20 or proc.poll() is not None, what="step 20")
        workers = sorted(children(proc.pid))
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGSTOP)
        if ends_by == "STOP file":
            (run / "STOP").touch()
        out, err = proc.communicate(timeout=300)  # ends instead of hanging for the default 30 minutes
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
    assert proc.returncode != 0
    if ends_by == "collective timeout":
        lines = harness_lines(err, "harness: error: rank 0: a collective after step ")
        assert len(lines) == 1 and "waited for another rank" in lines[0], err[-4000:]
        assert "distributed.timeout_minutes (now 0.1)" in lines[0] and "rerun the same command to resume" in lines[0]
    else:
        lines = harness_lines(err, "harness: error: rank 0: STOP file seen while step ")
        assert len(lines) == 1 and "exiting without a checkpoint" in lines[0], err[-4000:]
