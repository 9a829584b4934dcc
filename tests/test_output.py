"""What a run and a sweep print: plain progress lines off a terminal (no tqdm frames in a log file), the thread
rule's choice, and `harness train` printing it at start-up."""

from __future__ import annotations

import pytest
import torch

from harness.core.threads import choose_threads
from harness.sweep.local import SweepProgress
from harness.train.trainer import ProgressLines


def test_progress_lines_at_each_tenth_of_the_run(capsys):
    lines = ProgressLines(total=100, start=0, enabled=True, seconds=1e9)
    for step in range(5, 101, 5):
        lines.at(step, "loss 1")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "harness: step 10/100 (10%): loss 1" and out[-1] == "harness: step 100/100 (100%): loss 1"
    assert len(out) == 10 and "\r" not in "".join(out)


def test_progress_lines_resume_at_the_next_tenth_and_stay_off_when_disabled(capsys):
    resumed = ProgressLines(total=100, start=55, enabled=True, seconds=1e9)
    resumed.at(57, "x")
    resumed.at(60, "x")
    ProgressLines(total=100, start=0, enabled=False).at(100, "x")
    assert capsys.readouterr().out.splitlines() == ["harness: step 60/100 (60%): x"]


def test_sweep_progress_line_counts_runs_and_estimates_the_rest():
    p = SweepProgress("demo", [72] * 8, workers=2, enabled=False)
    assert p.line(10.0) == "sweep demo: 0/576 runs done, 2 tasks running, 576 left, ETA ?"
    p.runs_done, p.tasks_done = 144, 2
    assert p.line(60.0) == "sweep demo: 144/576 runs done, 2 tasks running, 432 left, ETA 3m00s"
    p.runs_done, p.tasks_done = 576, 8
    assert p.line(240.0) == "sweep demo: 576/576 runs done"


@pytest.mark.parametrize("cores, load, processes, threads", [
    (16, 0.2, 1, 16),  # an idle node: every core
    (16, 0.2, 4, 4),  # shared by the ranks (or sweep workers) of this node
    (2, 6.8, 1, 1),  # a busy node: what is free, at least one
    (16, 8.4, 2, 4),
])
def test_thread_rule(monkeypatch, cores, load, processes, threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    choice = choose_threads(processes, cores=cores, load=load)
    assert choice.threads == threads and "set OMP_NUM_THREADS to choose" in choice.describe()


def test_thread_rule_leaves_an_explicit_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    choice = choose_threads(1, cores=16, load=0.0)
    assert choice.threads is None and choice.describe() == "3 intra-op threads per process (OMP_NUM_THREADS)"


def test_train_sets_and_prints_its_threads(monkeypatch, capsys):
    from harness.cli import set_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")  # more ranks than cores: one thread each
    try:
        set_threads()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert capsys.readouterr().out.startswith("harness: threads 1 intra-op thread per process (")


def test_deepspeed_op_build_is_announced_only_when_not_cached(tmp_path, monkeypatch, capsys):
    from harness.train.deepspeed_engine import announce_op_build, uncached_op

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    so = uncached_op()
    assert so == tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"  # the CPU accelerator's op
    capsys.readouterr()  # DeepSpeed's own notes on picking the accelerator (first import only)
    announce_op_build(True)
    assert capsys.readouterr().out.startswith("harness: deepspeed: building its deepspeed_shm_comm op once")
    so.parent.mkdir()
    so.write_bytes(b"built")
    announce_op_build(True)
    assert uncached_op() is None and capsys.readouterr().out == ""
