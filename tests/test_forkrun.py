"""tests/forkrun.py: `run_harness` forks `python -m harness` from a warm interpreter. The forked command must behave
as a fresh `python -m harness` would for everything a test looks at: output, exit code, environment, directory."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, harness_env, run_harness, write_config


def both(*args, **kw):
    return run_harness(*args, check=False, **kw), run_harness(*args, check=False, fresh=True, **kw)


@pytest.mark.slow  # starts fresh interpreters to compare with
def test_a_forked_command_prints_and_exits_as_a_fresh_one(tmp_path):
    config = ROOT / "yaml" / "digits_mlp.yaml"
    for args in (["plan", config, "--set", "batch.global_batch_size=128"], ["plan", tmp_path / "missing.yaml"],
                 ["plan", config, "--set", "optim.nmae=sgd"], ["--help"]):
        forked, fresh = both(*args)
        assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr), args
    assert forked.returncode == 0 and "usage: harness" in forked.stdout
    assert both("plan", tmp_path / "missing.yaml")[0].returncode == 2  # a config error's own exit code


def test_a_forked_command_gets_the_tests_environment_and_directory(tmp_path, digits_shards):
    """The environment (read at run time, as every harness module does: checked below) and the working directory
    are the ones passed, not the forkserver's: a relative --run-dir lands in cwd, OMP_NUM_THREADS picks threads."""
    cfg = write_config(tmp_path / "c.yaml", f"""
seed: 0
model: {{name: mlp, hidden: [8]}}
data: {{name: digits, path: {digits_shards}}}
batch: {{global_batch_size: 64}}
budget: {{steps: 2}}
log: {{every_steps: 1, progress: false, tensorboard: false}}
""")
    proc = run_harness("train", cfg, "--run-dir", "rel", cwd=tmp_path, env=harness_env(OMP_NUM_THREADS=1))
    assert "harness: threads 1 intra-op thread per process (OMP_NUM_THREADS)" in proc.stdout, proc.stdout
    assert json.loads((tmp_path / "rel" / "result.json").read_text())["status"] == "completed"


def test_no_harness_module_reads_the_environment_at_import_time():
    """The forkserver imports the harness before a test's environment is set: a module-level read of os.environ
    would see the forkserver's. Every read must be inside a function (run time)."""
    offenders = []
    for package in ("harness", "data_pipelines", "models", "launch"):
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for node in tree.body:  # module-level statements only; functions and classes run later
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    continue
                names = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)} | \
                        {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
                if names & {"environ", "getenv"}:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not offenders, offenders


def test_the_forkserver_preloads_only_modules_that_exist():
    import importlib.util

    from tests import forkrun

    assert all(importlib.util.find_spec(m) is not None for m in forkrun.PRELOAD)
    assert Path(forkrun.__file__).parent == ROOT / "tests"


@pytest.mark.slow  # starts fresh interpreters to compare with
def test_omp_num_threads_sets_torch_threads_as_in_a_fresh_process(tmp_path, digits_shards):
    """OpenMP reads OMP_NUM_THREADS when torch loads it, which is in the forkserver: the child applies the test's
    value, so a run with OMP_NUM_THREADS=1 trains on one thread, forked or fresh (thread counts change a run's last
    bits). env.json records the threads a run had."""
    cfg = write_config(tmp_path / "c.yaml", f"""
model: {{name: mlp, hidden: [8]}}
data: {{name: digits, path: {digits_shards}}}
budget: {{steps: 1}}
log: {{progress: false, tensorboard: false}}
""")
    for n in ("1", "2"):
        for fresh in (False, True):
            run = tmp_path / f"run-{n}-{fresh}"
            run_harness("train", cfg, "--run-dir", run, env=harness_env(OMP_NUM_THREADS=n), fresh=fresh)
            assert json.loads((run / "env.json").read_text())["intra_op_threads"] == int(n), (n, fresh)
