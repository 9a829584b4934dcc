"""`python -m harness ARGS` without paying the interpreter's start-up: a process forked from a warm one.

Every `harness train` process imports torch (about 2.5 CPU-seconds on the project's VM) and, at its first optimizer
step, torch._dynamo (torch.optim imports it in `Optimizer.step`; about 2 CPU-seconds more). Hundreds of test runs
paid that again and again. Here a multiprocessing *forkserver* (one per pytest process: a fresh interpreter that
imports torch, torch._dynamo and the harness once, then forks a child per call) runs the command instead: the child
sets the environment, working directory, argv and standard streams it was given, runs `harness/__main__.py` as
`python -m harness` does (runpy, `__main__`), and ends the way the interpreter would (non-daemon threads joined,
atexit handlers run, streams flushed, the exit code of SystemExit, death by SIGINT for an uncaught Ctrl-C).

What differs from a fresh `python -m harness`: the modules were imported before the environment was set (no module
of the harness reads the environment at import time: tests/test_forkrun.py checks the ones that could matter), the
process's parent is the forkserver, not the test, and its stdin is /dev/null. Tests whose subject is the process
itself (signals, launchers, parent death, the entry point) start real processes; `run_harness(..., fresh=True)`
does too. `HARNESS_TESTS_FORK=0` turns this off for the whole suite.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

# What the forkserver imports once: what every `harness` command would import at start or first step.
PRELOAD = ["torch", "torch._dynamo", "torch.utils.tensorboard", "harness.cli", "harness.train.trainer",
           "harness.train.config", "data_pipelines", "data_pipelines.memory", "harness.sweep.cli",
           "harness.analysis.cli", "harness.probe.cli"]

_CONTEXT = None


def enabled() -> bool:
    return os.environ.get("HARNESS_TESTS_FORK", "1") != "0"


# Read by OpenMP and MKL when torch loads them, i.e. in the forkserver: a child applies the test's own value instead.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        from multiprocessing import forkserver

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        # The forkserver starts with this process's environment: without thread variables, so that torch keeps its
        # own default thread count there, as a fresh process without them would.
        saved = {k: os.environ.pop(k) for k in THREAD_VARIABLES if k in os.environ}
        try:
            forkserver.ensure_running()
        finally:
            os.environ.update(saved)
        _CONTEXT = ctx
    return _CONTEXT


def _apply_thread_variables(env: dict) -> None:
    """What a fresh interpreter does with OMP_NUM_THREADS at start: torch's intra-op threads follow it."""
    n = env.get("OMP_NUM_THREADS", "")
    if n.isdigit() and int(n) > 0:
        import torch

        torch.set_num_threads(int(n))


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message"): the interpreter prints it and exits 1
    return 1


def _child(args: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    """In the forked process: become `python -m harness ARGS` and end as the interpreter would."""
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.environ.clear()
    os.environ.update(env)
    _apply_thread_variables(env)
    os.chdir(cwd)
    sys.argv = [str(Path(__file__).resolve().parent.parent / "harness" / "__main__.py"), *args]
    code = 0
    try:
        runpy.run_module("harness", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = _exit_code(e.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:  # noqa: BLE001  (what the interpreter does with any uncaught exception)
        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()  # the interpreter joins non-daemon threads before atexit
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        if code == -signal.SIGINT:  # an uncaught KeyboardInterrupt: the interpreter dies of SIGINT (exit -2)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code & 0xFF if code >= 0 else 1)


def run(args: list[str], env: dict, cwd, timeout: float) -> subprocess.CompletedProcess:
    """`python -m harness ARGS` in a child of the warm forkserver; a CompletedProcess as subprocess.run gives."""
    with tempfile.TemporaryDirectory(prefix="forkrun-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = _context().Process(target=_child, args=(list(args), dict(env), str(cwd), out, err))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(["harness", *args], timeout, Path(out).read_text(), Path(err).read_text())
        return subprocess.CompletedProcess([sys.executable, "-m", "harness", *args], proc.exitcode,
                                           Path(out).read_text(errors="replace"), Path(err).read_text(errors="replace"))
