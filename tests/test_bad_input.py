"""Fuzz: malformed configs give exactly one line on stderr naming the problem, no traceback, non-zero exit.

Generated cases: an unknown key at every depth, a misspelling of every key, a wrong type for every key,
zero/negative sizes, impossible batch layouts, missing paths, malformed YAML. Most run through
`harness.cli.main` in this process (the CLI's own code path, without paying interpreter start-up 100 times);
a sample of each kind runs as a real subprocess too.
"""

from __future__ import annotations

import copy
import dataclasses
import typing

import pytest

import yaml
from harness.core.configlib import to_dict
from harness.train.config import Config, from_dict
from tests.conftest import run_harness

SECTIONS = ["model", "data", "batch", "optim", "schedule", "budget", "log", "eval", "checkpoint", "divergence"]


def base_config(shards) -> dict:
    return {
        "model": {"name": "wrn", "depth": 10, "width": 1},
        "data": {"name": "cifar10", "path": str(shards)},
        "batch": {"global_batch_size": 64},
        "budget": {"steps": 1},
        "log": {"progress": False, "tensorboard": False},
    }


def _leaves(cfg: Config) -> list[tuple[str, object, typing.Any]]:
    """(dotted key, default, annotation) of every leaf in the config tree."""
    out = []

    def walk(obj, prefix):
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            else:
                out.append((key, value, hints[f.name]))

    walk(cfg, "")
    return out


def _wrong_value(annotation) -> object:
    text = str(annotation)
    if "list" in text:
        return {"not": "a list"}
    if "bool" in text:
        return "maybe"
    if "int" in text or "float" in text:
        return "lots"
    return 12345  # str / Literal keys


def _set(tree: dict, dotted: str, value) -> dict:
    tree = copy.deepcopy(tree)
    *parents, last = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return tree


def _misspell(name: str) -> str:
    return name[:-1] if len(name) > 3 else name + "x"


def cases(shards) -> list[tuple[str, str]]:
    """(id, YAML text) of malformed configs."""
    base = base_config(shards)
    resolved = from_dict(base)
    out = []
    # Unknown keys at every depth, and a misspelling of every key.
    out.append(("unknown-top", yaml.safe_dump({**base, "bogus_key": 1})))
    for section in SECTIONS:
        out.append((f"unknown-{section}", yaml.safe_dump(_set(base, f"{section}.bogus_key", 1))))
    for key, default, _ in _leaves(resolved):
        *parents, last = key.split(".")
        if last == "name" and parents == ["model"]:
            continue
        tree = to_dict(resolved)
        node = tree
        for p in parents:
            node = node[p]
        node[_misspell(last)] = node.pop(last)
        out.append((f"misspelt-{key}", yaml.safe_dump(tree)))
    # A wrong type for every key.
    for key, _, annotation in _leaves(resolved):
        out.append((f"type-{key}", yaml.safe_dump(_set(base, key, _wrong_value(annotation)))))
    # Zero and negative sizes.
    for key in ["batch.global_batch_size", "batch.micro_batch_size", "batch.max_micro_batch_size",
                "data.eval_batch_size", "budget.steps", "log.every_steps", "checkpoint.keep", "model.depth",
                "model.width", "model.ghost_batch_size", "optim.effective_lr", "eval.every_steps"]:
        for bad in (0, -64):
            out.append((f"size-{key}={bad}", yaml.safe_dump(_set(base, key, bad))))
    out.append(("size-budget.epochs", yaml.safe_dump(_set(_set(base, "budget.steps", None), "budget.epochs", -1.5))))
    # Impossible batch layouts (W = 1 here).
    for b, m in [(100, None), (64, 48), (128, 96), (64, 128), (192, 128), (64, 32)]:
        out.append((f"layout-B{b}-m{m}", yaml.safe_dump(_set(_set(base, "batch.global_batch_size", b), "batch.micro_batch_size", m))))
    # Missing paths and wrong data.
    out.append(("path-missing", yaml.safe_dump(_set(base, "data.path", "/nonexistent/cifar10"))))
    out.append(("path-not-shards", yaml.safe_dump(_set(base, "data.path", "/tmp"))))
    out.append(("data-kind-mismatch", yaml.safe_dump(_set(base, "data.name", "cifar100"))))
    out.append(("budget-both", yaml.safe_dump(_set(base, "budget.epochs", 3))))
    out.append(("budget-too-small", yaml.safe_dump(_set(_set(base, "budget.steps", None), "budget.epochs", 0.01))))
    # Malformed YAML.
    out += [
        ("yaml-unclosed", "model: {name: wrn, depth: 10\n"),
        ("yaml-tab-indent", "model:\n\tname: wrn\n"),
        ("yaml-duplicate-key", f"data: {{name: cifar10, path: {shards}}}\nbudget: {{steps: 1}}\nbudget: {{steps: 2}}\n"),
        ("yaml-top-list", "- 1\n- 2\n"),
        ("yaml-top-scalar", "just a string\n"),
        ("yaml-section-scalar", f"data: {{name: cifar10, path: {shards}}}\nbudget: 5\n"),
        ("yaml-bad-indent", "model:\n  name: wrn\n depth: 10\n"),
        ("yaml-empty", ""),
    ]
    return out


@pytest.fixture(scope="module")
def fuzz_cases(cifar_shards):
    return cases(cifar_shards)


def test_there_are_over_a_hundred_cases(cifar_shards):
    assert len(cases(cifar_shards)) >= 100


def _check(code: int, err: str, case_id: str) -> None:
    lines = err.strip().splitlines()
    assert code in (2, 3, 4), (case_id, code, err)
    assert len(lines) == 1 and lines[0].startswith("harness: error: "), (case_id, err)
    assert "Traceback" not in err, case_id


def test_fuzz_in_process(fuzz_cases, tmp_path, capsys):
    from harness.cli import main

    for i, (case_id, text) in enumerate(fuzz_cases):
        path = tmp_path / f"case{i}.yaml"
        path.write_text(text)
        run_dir = tmp_path / f"run{i}"
        with pytest.raises(SystemExit) as e:
            main(["train", str(path), "--run-dir", str(run_dir)])
        _check(e.value.code, capsys.readouterr().err, case_id)
        assert not (run_dir / "result.json").exists(), case_id


@pytest.mark.slow
@pytest.mark.parametrize("pick", ["unknown-optim", "type-precision", "layout-B64-m48", "path-missing", "yaml-unclosed"])
def test_fuzz_as_real_processes(fuzz_cases, tmp_path, pick):
    text = dict(fuzz_cases)[pick]
    path = tmp_path / "case.yaml"
    path.write_text(text)
    proc = run_harness("train", path, "--run-dir", tmp_path / "run", check=False)
    _check(proc.returncode, proc.stderr, pick)


def test_missing_config_file_and_debug_flag(tmp_path):
    proc = run_harness("train", tmp_path / "nope.yaml", check=False)
    _check(proc.returncode, proc.stderr, "missing-file")
    assert "not found" in proc.stderr
    proc = run_harness("--debug", "train", tmp_path / "nope.yaml", check=False)
    assert "Traceback" in proc.stderr and proc.returncode != 0
