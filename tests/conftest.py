"""Shared fixtures: the real CLI in subprocesses, real shard files, real launchers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.core.threads import usable_cores
from tests import forkrun

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    """A suite started in the background (`make test &`, nohup, some CI runners) inherits SIGINT ignored: Python
    then keeps ignoring it, and so does every process the tests start, so Ctrl-C would reach no trainer and the
    Ctrl-C tests would fail. Give the suite Python's own handler back: started processes then get the default."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if not hasattr(config, "workerinput"):  # once, in the process that starts the run (not in each xdist worker)
        compile_sources()
    # `make test` runs one pytest worker per core (pytest-xdist). Each worker trains in-process models on its share
    # of the cores: torch's default (every core) would have the workers' OpenMP threads wait on each other at every
    # barrier and burn CPU doing it (measured: the packed WRN test, 49 s alone, took 127 CPU-seconds beside a second
    # worker on 2 cores). Processes the tests start choose their own threads (harness/core/threads.py, from the
    # load) or get OMP_NUM_THREADS from the test.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, usable_cores() // workers))


SOURCES = ("harness", "models", "data_pipelines", "launch", "benchmarks", "tests")


def compile_sources() -> None:
    """The repository's bytecode, written once before the tests start the hundreds of interpreters they start
    (torchrun ranks, sweep workers, SLURM jobs, plain `python -m harness`). Where PYTHONDONTWRITEBYTECODE is set (as
    in many containers and CI images) no interpreter writes a .pyc, so each one compiled the harness from source
    again: about 0.4 CPU-seconds per process (measured: importing the trainer, CLI and sweep took 2.7 CPU-s without
    the .pyc files, 2.3 with them). Reading .pyc files is not affected by that variable, and Python checks each one
    against its source's mtime and size, so an edited file is compiled afresh, never run stale."""
    import compileall

    for name in SOURCES:
        compileall.compile_dir(str(ROOT / name), quiet=2)  # about 0.6 s for all of them


def _module_fixture(item) -> bool:
    """Whether the test uses a module-scoped fixture (a reference run, the quick start, a trained checkpoint)."""
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(defs and defs[-1].scope == "module" for defs in info.name2fixturedefs.values())


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group marks (--dist loadgroup)
def pytest_collection_modifyitems(session, config, items):
    """How `make test` shares the suite among its workers (pytest-xdist, `--dist loadgroup`).

    - The tests of a module that share a module-scoped fixture run on one worker, so the fixture (a reference run
      that several tests compare against, the README's quick start) is computed once, as in a serial run.
    - The tests that submit to the SLURM test cluster run on one worker, so one cluster serves the whole run (a
      session fixture is per worker): they mostly wait for jobs, whose processes do the work.
    - The SLURM tests first, then the other slow tests, then the fast ones: the long ones start early and the short
      ones fill the gaps at the end, instead of one long test starting last and running alone. The SLURM group is
      the longest (6 to 9 minutes) and mostly waits for its jobs (measured alone: 378 s wall, 394 of 756 core-seconds
      busy on 2 cores), so the other worker's CPU-bound tests run beside it; the process-fault tests, which also
      mostly wait (on timeouts and other processes), are no longer started beside it at the same time (that left
      both cores half idle for the first minutes). The order within each tier is the collection order; no test
      depends on another's having run.
    """
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("slurm_cluster"))
        elif _module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))

    def tier(item) -> int:
        if item.get_closest_marker("slow") is None:
            return 2
        return 0 if "slurm" in item.nodeid else 1

    items.sort(key=tier)  # stable


def harness_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_harness(*args, env=None, check=True, timeout=600, cwd=None, fresh=False) -> subprocess.CompletedProcess:
    """`python -m harness ARGS` as a user would run it; returns the completed process.

    The process is forked from a warm interpreter that has torch and the harness imported (tests/forkrun.py): the
    same code from `harness/__main__.py` on, without the 4-5 CPU-seconds of start-up a fresh interpreter pays.
    `fresh=True` (or HARNESS_TESTS_FORK=0) starts a new interpreter, for tests whose subject is the process itself."""
    args = [str(a) for a in args]
    env = env or harness_env()
    if fresh or not forkrun.enabled():
        proc = subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True,
                              env=env, timeout=timeout, cwd=cwd or ROOT)
    else:
        proc = forkrun.run(args, env, cwd or ROOT, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"harness {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def torchrun(nproc: int, *args, nnodes: int = 1, extra=(), env=None, check=True, timeout=900) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m harness ARGS` (gloo on CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *extra,
           "-m", "harness", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env or harness_env(OMP_NUM_THREADS=1),
                          timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-6000:]}")
    return proc


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "checkpoints" / "final.pt", weights_only=True)["model"]


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.fixture(scope="session")
def cifar_shards(tmp_path_factory) -> Path:
    """Synthetic CIFAR-10-format shards (512 train / 256 test), real tar files with a manifest."""
    from data_pipelines.synth import synth

    dest = tmp_path_factory.mktemp("cifar10")
    synth("cifar10", dest, train=512, test=256, seed=0, per_shard=200)
    return dest


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    from data_pipelines.convert import convert_digits

    dest = tmp_path_factory.mktemp("digits")
    convert_digits(dest)
    return dest


@pytest.fixture(scope="session")
def mnist1d_shards(tmp_path_factory) -> Path:
    """MNIST-1D as `harness data convert mnist1d - DIR` writes it (generated by the mnist1d package, offline)."""
    from data_pipelines.convert import convert

    dest = tmp_path_factory.mktemp("mnist1d")
    convert("mnist1d", "-", dest)
    return dest


@pytest.fixture(scope="session")
def imagenet_shards(tmp_path_factory) -> Path:
    """Synthetic ImageNet-format JPEG shards: 4 classes, 256 train (4 shards) / 96 val (2 shards), small images."""
    from data_pipelines.synth import synth

    dest = tmp_path_factory.mktemp("imagenet")
    synth("imagenet", dest, train=256, test=96, seed=0)
    return dest


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real SLURM cluster on this machine: munged, slurmctld and two `slurmd -N node1/node2` (4 fake GPUs and
    32 CPUs each), private to this session; installs slurm-wlm and munge with apt-get if missing.
    API: tests/slurm_cluster.py (sbatch, wait, output, squeue, signal, step_nodes, env, logs)."""
    from tests.slurm_cluster import SlurmCluster

    with SlurmCluster(nodes=2) as cluster:
        yield cluster
