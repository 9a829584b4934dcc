"""Checkpoint integrity with the real trainer (harness/train/checkpoint.py): a checkpoint that is corrupt, truncated,
of the wrong content or not a file at all is skipped with a one-line warning and the run ends bitwise equal to an
uninterrupted one; when no checkpoint is usable the run stops with exit 6 and deletes nothing; temp files of
killed saves are removed; files follow the umask. The digits MLP in fp64, in-process (`harness.cli.main`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from harness.cli import main
from harness.core.errors import CheckpointError
from harness.core.io import atomic_write_text, make_temp_dir
from harness.train.checkpoint import Checkpointer
from harness.train.config import from_dict
from harness.train.packed import train_pack
from tests.conftest import ROOT, final_state, harness_env, write_config

CONFIG = """
seed: 3
precision: fp64
model: {{name: mlp, hidden: [16]}}
data: {{name: digits, path: {shards}}}
batch: {{global_batch_size: 64}}
optim: {{name: momentum, effective_lr: 1.0}}
budget: {{steps: 12}}
eval: {{every_steps: null}}
checkpoint: {{every_steps: 2, every_minutes: null, keep: 3}}
log: {{every_steps: 4, progress: false, tensorboard: false}}
"""
LATEST, PREVIOUS = "step-00000010.pt", "step-00000008.pt"


def harness(*args) -> int:
    """`harness ARGS` in this process: its exit code."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    return exit_.value.code


def bitwise_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_shards):
    """(config, an uninterrupted run with checkpoints at steps 6, 8 and 10)."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = write_config(tmp / "c.yaml", CONFIG.format(shards=digits_shards))
    assert harness("train", cfg, "--run-dir", tmp / "run") == 0
    assert sorted(p.name for p in (tmp / "run" / "checkpoints").glob("step-*.pt")) == [
        "step-00000006.pt", PREVIOUS, LATEST]
    return cfg, tmp / "run"


@pytest.fixture
def interrupted(tmp_path, trained):
    """A copy of the run as if its job had died after the step-10 checkpoint: (config, run dir)."""
    cfg, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "result.json").unlink()
    (copy / "checkpoints" / "final.pt").unlink()
    return cfg, copy


def data_offset(path: Path, member_suffix: str) -> tuple[int, int]:
    """(offset, size) of the bytes of the largest zip record whose name ends with `member_suffix`."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if i.filename.endswith(member_suffix)), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def flip_byte(path: Path, member_suffix: str) -> None:
    offset, size = data_offset(path, member_suffix)
    data = bytearray(path.read_bytes())
    data[offset + size // 2] ^= 0x01  # one bit
    path.write_bytes(bytes(data))


def resave(path: Path, change) -> None:
    """Rewrite a checkpoint with `change(payload)` applied (a checkpoint that loads, with the wrong content)."""
    payload = torch.load(path, weights_only=True)
    torch.save(change(payload), path)


def edit(fn):
    def change(payload):
        fn(payload)
        return payload
    return change


def first_weight(payload) -> str:
    return next(iter(payload["model"]))


def map_first_weight(fn):
    """A change that replaces the model's first weight w by fn(w)."""
    return edit(lambda d: d["model"].update({first_weight(d): fn(d["model"][first_weight(d)])}))


def momentum_buffer_flattened(payload):
    buf = payload["optimizer"]["state"][0]["momentum_buffer"]
    payload["optimizer"]["state"][0]["momentum_buffer"] = buf.reshape(-1)


UNREADABLE = {
    "one bit flipped in a tensor": lambda p: flip_byte(p, "/data/0"),
    "one bit flipped in the pickle": lambda p: flip_byte(p, "data.pkl"),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty file": lambda p: p.write_bytes(b""),
    "a directory": lambda p: (p.unlink(), p.mkdir(), (p / "data.pkl").write_bytes(b"x")),
    "a FIFO": lambda p: (p.unlink(), os.mkfifo(p)),
}
UNFIT = {  # checkpoints that load, with the wrong content
    "{}": lambda p: torch.save({}, p),
    "a list": lambda p: torch.save([1, 2], p),
    "wrong shape": lambda p: resave(p, map_first_weight(lambda w: w.t())),
    "wrong dtype": lambda p: resave(p, map_first_weight(lambda w: w.float())),
    "missing model key": lambda p: resave(p, edit(lambda d: d["model"].pop(first_weight(d)))),
    "extra model key": lambda p: resave(p, edit(lambda d: d["model"].update({"extra.weight": torch.zeros(2)}))),
    "momentum buffer of the wrong shape": lambda p: resave(p, edit(momentum_buffer_flattened)),
    "extra state key": lambda p: resave(p, edit(lambda d: d["state"].update({"epoch": 3}))),
    "missing state key": lambda p: resave(p, edit(lambda d: d["state"].pop("step"))),
    "bad state field": lambda p: resave(p, edit(lambda d: d["state"].update({"step": "10"}))),
    "state of another step": lambda p: resave(p, edit(lambda d: d["state"].update({"step": 9}))),
    "no rng": lambda p: resave(p, edit(lambda d: d.pop("rng"))),
}
HOSTILE = {**UNREADABLE, **UNFIT}


def snapshot(directory: Path) -> dict[str, bytes | str]:
    """Every entry of a checkpoint directory: a file's bytes, else its kind (nothing deleted, nothing changed)."""
    out = {}
    for p in sorted(directory.iterdir()):
        mode = p.stat().st_mode
        out[p.name] = p.read_bytes() if stat.S_ISREG(mode) else stat.S_IFMT(mode)
    return out


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_unusable_latest_checkpoint_falls_back_to_the_previous_one(interrupted, trained, capsys, kind):
    cfg, run = interrupted
    latest = run / "checkpoints" / LATEST
    if kind == "a directory":  # newest, at a step the run never writes, so that it can finish around it
        latest = run / "checkpoints" / "step-00000011.pt"
        latest.mkdir()
        (latest / "data.pkl").write_bytes(b"x")
        expect = LATEST
    else:
        HOSTILE[kind](latest)
        expect = PREVIOUS
    assert harness("train", cfg, "--run-dir", run) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("harness: warning: ")]
    assert len(warnings) == 1, err
    what = "does not fit this run" if kind in UNFIT else "is unreadable"
    assert f"checkpoint {latest} {what} (" in warnings[0] and warnings[0].endswith(
        "falling back to the previous one")
    assert f"resumed from {run / 'checkpoints' / expect}" in out
    assert json.loads((run / "result.json").read_text())["status"] == "completed"
    assert bitwise_equal(final_state(run), final_state(trained[1]))
    if kind == "a directory":
        assert (latest / "data.pkl").read_bytes() == b"x"  # never rotated away


ALL_BAD = ["one bit flipped in a tensor", "truncated", "{}", "wrong shape", "extra state key", "bad state field",
           "a directory", "a FIFO"]


@pytest.mark.parametrize("kind", ALL_BAD)
def test_no_usable_checkpoint_exits_6_and_deletes_nothing(interrupted, capsys, kind):
    cfg, run = interrupted
    ckpts = run / "checkpoints"
    for p in ckpts.glob("step-*.pt"):
        HOSTILE[kind](p)
    before = snapshot(ckpts)
    assert harness("train", cfg, "--run-dir", run) == 6
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert "Traceback" not in err and "resumed from" not in out
    assert len([line for line in lines if line.startswith("harness: warning: ")]) == 3
    assert lines[-2].endswith("no older checkpoint to fall back to")
    error = lines[-1]
    assert error.startswith(f"harness: error: no usable checkpoint ({ckpts}: {LATEST}, {PREVIOUS}, step-00000006.pt;")
    assert error.endswith(f"mv {ckpts} {ckpts}.unusable")
    assert snapshot(ckpts) == before
    assert not (run / "result.json").exists()


def test_checkpoint_without_checksums_loads_unverified(interrupted, trained, capsys):
    """A checkpoint saved with torch's compute_crc32 off (every CRC field 0) cannot be verified: it loads, with a
    warning."""
    from torch.utils.serialization import config as serialization_config

    cfg, run = interrupted
    latest = run / "checkpoints" / LATEST
    payload = torch.load(latest, weights_only=True)
    with serialization_config.patch({"save.compute_crc32": False}):
        torch.save(payload, latest)
    assert harness("train", cfg, "--run-dir", run) == 0
    out, err = capsys.readouterr()
    assert f"checkpoint {latest} has no checksums" in err and f"resumed from {latest}" in out
    assert bitwise_equal(final_state(run), final_state(trained[1]))


def test_checkpoints_carry_crc32_of_every_record(trained):
    for p in (trained[1] / "checkpoints").glob("*.pt"):
        with zipfile.ZipFile(p) as z:
            assert z.testzip() is None and all(i.CRC for i in z.infolist() if i.file_size)


KILLED_SAVE = """
import os, signal, sys
from harness.core.io import atomic_write
def write(f):
    f.write(open(sys.argv[2], "rb").read())
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # mid-save, before the rename
atomic_write(sys.argv[1], write)
"""


def test_stray_temp_files_of_killed_saves_are_removed(interrupted, trained, capsys):
    cfg, run = interrupted
    ckpts = run / "checkpoints"
    killed = subprocess.run([sys.executable, "-c", KILLED_SAVE, ckpts / "step-00000012.pt", ckpts / LATEST],
                            env=harness_env(), cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL
    (left,) = [p for p in ckpts.iterdir() if p.name.startswith(".step-00000012.pt.")]  # what a killed save leaves
    stray = [left, ckpts / ".step-00000010.pt.x_9yz07q.tmp", ckpts / ".final.pt.0f0f0f0f.tmp"]  # mkstemp's names
    for p in stray[1:]:
        shutil.copy(ckpts / LATEST, p)
    kept = [ckpts / ".notes.tmp", ckpts / "step-00000010.pt.bak", run / ".step-00000010.pt.a1b2c3d4.tmp"]
    for p in kept:
        p.write_text("mine")
    assert harness("train", cfg, "--run-dir", run) == 0
    _, err = capsys.readouterr()
    assert "removed 3 temp file(s)" in err
    assert not any(p.exists() for p in stray) and all(p.read_text() == "mine" for p in kept)
    assert bitwise_equal(final_state(run), final_state(trained[1]))


def test_a_directory_where_a_checkpoint_must_be_written_is_exit_6(tmp_path):
    (tmp_path / "step-00000004.pt").mkdir()
    with pytest.raises(CheckpointError, match=r"a directory has that name; move it away \(mv .*step-00000004.pt "):
        Checkpointer(tmp_path, keep=2, is_main=True).save(4, {"w": torch.ones(2)})
    assert CheckpointError.exit_code == 6


PACK = {"seed": 0, "precision": "fp64", "device": "cpu", "model": {"name": "mlp", "hidden": [16]},
        "batch": {"global_batch_size": 64}, "budget": {"steps": 12}, "eval": {"every_steps": None},
        "checkpoint": {"every_steps": 2, "every_minutes": None, "keep": 3},
        "log": {"every_steps": 4, "progress": False, "tensorboard": False}}


def pack_configs(digits):
    return [from_dict({**PACK, "data": {"name": "digits", "path": str(digits)}, "seed": seed,
                       "optim": {"name": "momentum", "effective_lr": lr}}) for seed, lr in ((0, 1.0), (1, 0.5))]


@pytest.fixture(scope="module")
def packed(tmp_path_factory, digits_shards):
    tmp = tmp_path_factory.mktemp("pack")
    dirs = [tmp / "a", tmp / "b"]
    assert [r["status"] for r in train_pack(pack_configs(digits_shards), dirs)] == ["completed"] * 2
    return dirs


def interrupted_pack(tmp_path, dirs) -> list[Path]:
    copies = []
    for d in dirs:
        shutil.copytree(d, tmp_path / d.name)
        (tmp_path / d.name / "result.json").unlink()
        (tmp_path / d.name / "checkpoints" / "final.pt").unlink()
        copies.append(tmp_path / d.name)
    return copies


@pytest.mark.parametrize("kind", ["one bit flipped in a tensor", "wrong shape"])
def test_packed_runs_fall_back_to_an_older_common_step(tmp_path, digits_shards, packed, capsys, kind):
    dirs = interrupted_pack(tmp_path, packed)
    bad = dirs[1] / "checkpoints" / LATEST
    HOSTILE[kind](bad)
    assert [r["status"] for r in train_pack(pack_configs(digits_shards), dirs)] == ["completed"] * 2
    out, err = capsys.readouterr()
    assert f"checkpoint {bad} " in err and "falling back to the previous one" in err
    assert "pack of 2 runs resumed from step 8" in out
    for d, ref in zip(dirs, packed):
        assert bitwise_equal(final_state(d), final_state(ref))


def test_packed_runs_with_no_usable_common_step_raise_exit_6(tmp_path, digits_shards, packed, capsys):
    dirs = interrupted_pack(tmp_path, packed)
    for p in (dirs[0] / "checkpoints").glob("step-*.pt"):
        HOSTILE["truncated"](p)
    before = [snapshot(d / "checkpoints") for d in dirs]
    with pytest.raises(CheckpointError, match=f"no usable checkpoint .*mv {dirs[0] / 'checkpoints'} "):
        train_pack(pack_configs(digits_shards), dirs)
    assert [snapshot(d / "checkpoints") for d in dirs] == before


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_and_directories_follow_the_umask(tmp_path, digits_shards, umask):
    """Everything a run, a dataset conversion and an analysis export write is 0666 / 0777 less the umask (the
    temp-then-rename writers used to leave 0600 files: teammates could not read a shared project)."""
    from data_pipelines.convert import convert_digits

    old = os.umask(umask)
    try:
        cfg = write_config(tmp_path / "c.yaml", CONFIG.format(shards=digits_shards))
        assert harness("train", cfg, "--run-dir", tmp_path / "run") == 0
        convert_digits(tmp_path / "digits")
        export = make_temp_dir(tmp_path, ".export-")
        atomic_write_text(export / "study.json", "{}")
    finally:
        os.umask(old)
    entries = [p for d in ("run", "digits", export.name) for p in [tmp_path / d, *(tmp_path / d).rglob("*")]]
    names = {p.relative_to(tmp_path).as_posix() for p in entries}
    assert {"run/config.yaml", "run/env.json", "run/result.json", "run/checkpoints/final.pt",
            f"run/checkpoints/{LATEST}", "digits/manifest.json"} <= names
    wrong = {p.relative_to(tmp_path).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in entries
             if stat.S_IMODE(p.stat().st_mode) != (0o777 if p.is_dir() else 0o666) & ~umask}
    assert not wrong
