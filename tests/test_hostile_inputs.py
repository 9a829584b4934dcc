"""Hostile inputs and OS errors: every one is a single `harness: error:` line with its documented exit code, no
traceback, no hang, and nothing already written is lost.

Exit codes (harness/core/errors.py): 2 config, 3 plan, 4 data, 7 sweep, 8 file system / OS error. The CLI runs in
this process (`harness.cli.main`); the disk-full and read-only cases use real tmpfs and read-only bind mounts
(root in this sandbox; skipped where mounting is not allowed), unmounted by the fixture.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest

import yaml
from harness.cli import main
from tests.conftest import run_harness
from tests.test_analysis_curves import autoencoder_sweep

# ---------------------------------------------------------------------------------------------- helpers


def fails(argv: list[str], code: int, capsys) -> str:
    """Run the CLI; assert it exits `code` with exactly one `harness: error:` line and no traceback; the line."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("harness: error: ")]
    assert e.value.code == code, (e.value.code, err)
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def succeeds(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 0 and "Traceback" not in err and "harness: error" not in err, err
    return err


def config(data: Path, **sections) -> dict:
    base = {
        "model": {"name": "mlp", "hidden": [64]},
        "data": {"name": "cifar10", "path": str(data)},
        "batch": {"global_batch_size": 64},
        "budget": {"steps": 30},
        "log": {"progress": False, "tensorboard": False, "every_steps": 1},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return base


def write(path: Path, obj_or_text) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj_or_text if isinstance(obj_or_text, str) else yaml.safe_dump(obj_or_text))
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def sh(*cmd: str) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.fixture
def mounts():
    """mount(kind, dir, ...) for tmpfs and read-only bind mounts; every mount is undone at the end."""
    done: list[Path] = []

    def mount(target: Path, *, size: str | None = None, bind_ro: Path | None = None) -> Path:
        target.mkdir(parents=True, exist_ok=True)
        if size is not None:
            ok = sh("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target))
        else:
            ok = sh("mount", "--bind", str(bind_ro), str(target))
            if ok:
                done.append(target)
                ok = sh("mount", "-o", "remount,bind,ro", str(target))
        if not ok:
            pytest.skip("mounting a tmpfs or bind mount needs root (mount(8) failed)")
        if target not in done:
            done.append(target)
        return target

    yield mount
    for target in reversed(done):
        if not sh("umount", str(target)):
            sh("umount", "-l", str(target))


@pytest.fixture
def data_copy(cifar_shards, tmp_path) -> Path:
    dest = tmp_path / "data"
    shutil.copytree(cifar_shards, dest)
    return dest


def edit_manifest(root: Path, edit) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def rewrite_shard(root: Path, name: str, members) -> None:
    """Replace shard `name` by a tar of `members` [(member name, bytes)] and update its manifest entry."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (root / name).write_bytes(buf.getvalue())

    def edit(m):
        for entry in m["splits"].values():
            for shard in entry["shards"]:
                if shard["name"] == name:
                    shard.update(bytes=len(buf.getvalue()), sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    edit_manifest(root, edit)


def shard_members(root: Path, name: str) -> list[tuple[str, bytes]]:
    with tarfile.open(root / name) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit grey pixels (a decompression bomb's header; the harness
    must refuse it from the header, so the pixel data is never needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def png_zeros(width: int, height: int) -> bytes:
    """A real, decodable width x height grey PNG of zeros (a few kB for 16 M pixels: a bomb of modest size)."""
    row = b"\0" + b"\0" * width
    raw = zlib.compress(row * height, 9)
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------- config values

CONFIG_CASES = {
    "seed-negative": ({"seed": -1}, "seed: must be >= 0"),
    "seed-1e26": ({"seed": 10**26}, "seed: must be <= 4,294,967,295"),
    "seed-2^32": ({"seed": 2**32}, "seed: must be <= 4,294,967,295"),
    "seed-float-1e26": ({"seed": 1e26}, "seed: must be <= 4,294,967,295"),
    "batch-10^18": ({"batch": {"global_batch_size": 10**18}}, "global_batch_size: must be <= 16,777,216"),
    "batch-2^24+1": ({"batch": {"global_batch_size": 2**24 + 1}}, "global_batch_size: must be <= 16,777,216"),
    "micro-batch-10^18": ({"batch": {"micro_batch_size": 10**18}}, "larger than the largest global batch"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_values_out_of_range(case, cifar_shards, tmp_path, capsys):
    change, expected = CONFIG_CASES[case]
    path = write(tmp_path / "c.yaml", config(cifar_shards, **change))
    code = 3 if case.startswith("micro") else 2
    assert expected in fails(["train", path, "--run-dir", tmp_path / "run"], code, capsys)
    assert not (tmp_path / "run").exists()


def test_a_huge_batch_is_planned_or_refused_at_once(cifar_shards, tmp_path, capsys):
    # 2^24 itself is allowed: the divisor search over it is bounded (4096 trial divisions), so plan answers.
    path = write(tmp_path / "c.yaml", config(cifar_shards, batch={"global_batch_size": 2**24 - 1}))
    with pytest.raises(SystemExit) as e:
        main(["plan", str(path)])
    assert e.value.code == 0, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- YAML

BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
YAML_CASES = {
    "alias-bomb": (BOMB, "expands to more than 100,000 values"),
    "deep-flow-5000": ("model: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 64 levels deep"),
    "deep-block-3000": ("model:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 3000)), "nested more than 64"),
    "deep-mapping-flow": ("model: " + "{a: " * 2000 + "1" + "}" * 2000 + "\n", "nested more than 64 levels deep"),
}


@pytest.mark.parametrize("case", YAML_CASES)
@pytest.mark.parametrize("command", ["train", "sweep"])
def test_yaml_bombs_and_deep_nesting(case, command, tmp_path, capsys):
    text, expected = YAML_CASES[case]
    path = write(tmp_path / "hostile.yaml", text)
    line = fails([command, path], 2, capsys)
    assert expected in line and str(path) in line


def test_an_oversized_yaml_file_is_refused_unread(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    with open(path, "wb") as f:
        f.truncate(17 * 2**20)  # sparse: costs no disk
    assert "more than the 16,777,216" in fails(["train", path], 2, capsys)


def test_a_deeply_nested_set_value_is_one_line(cifar_shards, tmp_path, capsys):
    path = write(tmp_path / "c.yaml", config(cifar_shards))
    fails(["plan", path, "--set", "seed=" + "[" * 3000 + "]" * 3000], 2, capsys)


# ---------------------------------------------------------------------------------------------- sweep grids


def spec(data: Path, grid) -> dict:
    return {"name": "hostile", "base": config(data), "grid": grid}


GRID_CASES = {
    "range-10^9": ({"seed": {"range": 10**9}}, "1,000,000,000 values, more than the 10,000"),
    "range-pair-10^12": ({"seed": {"range": [0, 10**12]}}, "more than the 10,000 an axis may have"),
    "log2-tiny-step": ({"optim.effective_lr": {"log2": [-20, 20], "step": 1e-6}}, "more than the 10,000"),
    "list-10001": ({"seed": list(range(10_001))}, "10,001 values"),
    "product-10^6": ({"seed": {"range": 100}, "optim.effective_lr": {"log2": [-49, 50]},
                      "optim.weight_decay": {"log2": [-99, 0]}}, "the grid has 1,000,000 points (100 x 100 x 100)"),
    "union-over-limit": ([{"seed": {"range": 10_000}}] * 6, "60,000 points"),
    "grid-empty-mapping": ({}, "grid: an empty mapping"),
    "grid-list-of-empty": ([{}], "grid: an empty mapping"),
    "grid-empty-list": ([], "grid: an empty list"),
}


@pytest.mark.parametrize("case", GRID_CASES)
def test_grids_too_large_or_empty(case, cifar_shards, tmp_path, capsys):
    grid, expected = GRID_CASES[case]
    path = write(tmp_path / "spec.yaml", spec(cifar_shards, grid))
    assert expected in fails(["sweep", path, "--sweep-dir", tmp_path / "sweep"], 2, capsys)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("missing", ["every-run", "one-of-two-paths"])
def test_a_sweep_checks_every_data_path_before_running_anything(missing, cifar_shards, tmp_path, capsys):
    absent = tmp_path / "no-such-data"
    grid = {"seed": {"range": 40}}
    if missing == "one-of-two-paths":  # (data.path is a layout key: runs that differ only in it are one run)
        grid = [{"seed": [0, 1], "data.path": [str(cifar_shards)]}, {"seed": [2, 3], "data.path": [str(absent)]}]
    body = spec(absent if missing == "every-run" else cifar_shards, grid)
    path = write(tmp_path / "spec.yaml", body)
    line = fails(["sweep", path, "--sweep-dir", tmp_path / "sweep"], 4, capsys)
    assert f"data path {absent} does not exist" in line
    assert not (tmp_path / "sweep").exists()  # no run directories, no error.txt per run


def test_a_finished_sweep_needs_no_data(tmp_path, capsys):
    """The up-front check covers the runs still to run: a complete sweep whose data was moved away is complete."""
    from harness.sweep.spec import load_spec

    path = write(tmp_path / "spec.yaml", spec(tmp_path / "moved-away", {"seed": [0, 1]}))
    for run in load_spec(path).runs:
        write(run.dir(tmp_path / "sweep") / "result.json", json.dumps({"status": "completed"}))
    before = snapshot(tmp_path / "sweep")
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(path), "--sweep-dir", str(tmp_path / "sweep")])
    assert e.value.code == 0 and "0 to run" in capsys.readouterr().out
    assert {k: v for k, v in snapshot(tmp_path / "sweep").items() if k in before} == before


# ---------------------------------------------------------------------------------------------- manifests

MANIFEST_CASES = {
    "splits-list": (lambda m: m.update(splits=[]), "splits is '[]', not a mapping"),
    "splits-empty": (lambda m: m.update(splits={}), "with a 'train' split"),
    "split-not-mapping": (lambda m: m["splits"].update(test="x"), "split 'test' lacks a size"),
    "image-shape-string": (lambda m: m.update(image_shape="3x32x32"), "image_shape is '3x32x32'"),
    "image-shape-two": (lambda m: m.update(image_shape=[32, 32]), "image data needs image_shape [C, H, W]"),
    "image-shape-negative": (lambda m: m.update(image_shape=[3, -32, 32]), "not a list of positive sizes"),
    "classes-string": (lambda m: m.update(classes="ten"), "classes is 'ten'"),
    "no-sha256": (lambda m: m["splits"]["train"]["shards"][0].pop("sha256"), "sha256 is None"),
    "short-sha256": (lambda m: m["splits"]["train"]["shards"][0].update(sha256="abc"), "not a 64-digit hex"),
    "kind-missing": (lambda m: m.pop("kind"), "kind is None"),
    "count-negative": (lambda m: m["splits"]["train"]["shards"][0].update(count=-1), "non-negative integers"),
}


@pytest.mark.parametrize("text,expected", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply to be a manifest"),
    (None, "more than the 67,108,864 a manifest has"),
], ids=["nested-100000", "oversized"])
def test_manifests_that_would_exhaust_the_stack_or_memory(text, expected, data_copy, tmp_path, capsys):
    if text is None:
        with open(data_copy / "manifest.json", "r+b") as f:
            f.truncate(2**30)  # sparse: no disk used, and never read
    else:
        (data_copy / "manifest.json").write_text(text)
    path = write(tmp_path / "c.yaml", config(data_copy))
    assert expected in fails(["train", path, "--run-dir", tmp_path / "run"], 4, capsys)


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_malformed_manifests(case, data_copy, tmp_path, capsys):
    edit, expected = MANIFEST_CASES[case]
    edit_manifest(data_copy, edit)
    path = write(tmp_path / "c.yaml", config(data_copy))
    line = fails(["train", path, "--run-dir", tmp_path / "run"], 4, capsys)
    assert expected in line and "manifest.json" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["../outside.tar", "ABSOLUTE", "sub/train-000000.tar", "..", ""])
def test_shard_names_are_confined_to_the_data_directory(name, data_copy, tmp_path, capsys):
    outside = tmp_path / "outside.tar"
    shutil.copy(data_copy / "train-000000.tar", outside)
    name = str(outside) if name == "ABSOLUTE" else name
    edit_manifest(data_copy, lambda m: m["splits"]["train"]["shards"][0].update(name=name))
    path = write(tmp_path / "c.yaml", config(data_copy))
    for command in (["train", path, "--run-dir", tmp_path / "run"], ["data", "verify", data_copy]):
        assert "not a file name inside the data directory" in fails(command, 4, capsys)


# ---------------------------------------------------------------------------------------------- shard contents


def test_a_member_twice_in_one_sample_is_a_data_error(data_copy, tmp_path, capsys):
    members = shard_members(data_copy, "train-000000.tar")
    rewrite_shard(data_copy, "train-000000.tar", [members[0], members[0], *members[1:]])
    path = write(tmp_path / "c.yaml", config(data_copy))
    assert "duplicate file name" in fails(["train", path, "--run-dir", tmp_path / "run"], 4, capsys)


def test_a_key_twice_in_a_split_is_a_data_error(data_copy, tmp_path, capsys):
    members = shard_members(data_copy, "train-000000.tar")
    first = [m for m in members if m[0].startswith(members[0][0].split(".")[0] + ".")]
    rewrite_shard(data_copy, "train-000000.tar", [*members, *first])  # sample 0 again at the end
    path = write(tmp_path / "c.yaml", config(data_copy))
    assert "appears twice in the split" in fails(["train", path, "--run-dir", tmp_path / "run"], 4, capsys)


@pytest.mark.parametrize("png,expected", [
    (lambda: png_header_only(14_000, 14_000), "decompression bomb"),  # PIL raises: over 2 x MAX_IMAGE_PIXELS
    (lambda: png_header_only(10_000, 10_000), "decompression bomb"),  # PIL warns: over MAX_IMAGE_PIXELS
    (lambda: png_zeros(4096, 4096), "a 4096x4096 image, the manifest says 32x32"),  # decodable, refused unread
], ids=["bomb-error", "bomb-warning", "16M-pixels"])
def test_png_decompression_bombs_are_refused(png, expected, data_copy, tmp_path, capsys):
    members = shard_members(data_copy, "train-000000.tar")
    image = next(i for i, (n, _) in enumerate(members) if n.endswith(".png"))
    members[image] = (members[image][0], png())
    rewrite_shard(data_copy, "train-000000.tar", members)
    path = write(tmp_path / "c.yaml", config(data_copy))
    line = fails(["train", path, "--run-dir", tmp_path / "run"], 4, capsys)
    assert expected in line and "is unreadable" in line


# ---------------------------------------------------------------------------------------------- run directories


@pytest.mark.parametrize("where", ["run-dir-is-a-file", "parent-is-a-file"])
def test_run_dir_naming_an_existing_file(where, cifar_shards, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me\n")
    run_dir = blocker if where == "run-dir-is-a-file" else blocker / "run"
    path = write(tmp_path / "c.yaml", config(cifar_shards))
    assert f"{blocker} is an existing file, not a directory" in fails(["train", path, "--run-dir", run_dir], 8, capsys)
    assert blocker.read_text() == "keep me\n"


def test_sweep_dir_naming_an_existing_file(cifar_shards, tmp_path, capsys):
    blocker = tmp_path / "sweep"
    blocker.write_text("keep me\n")
    path = write(tmp_path / "spec.yaml", spec(cifar_shards, {"seed": [0, 1]}))
    assert "is an existing file" in fails(["sweep", path, "--sweep-dir", blocker], 8, capsys)
    assert blocker.read_text() == "keep me\n"


# ---------------------------------------------------------------------------------------------- OS errors


# Sizes: the run directory's lock file, config.yaml and env.json take a 4 KiB page each; the first file that no
# longer fits is the one named (measured on tmpfs).
@pytest.mark.parametrize("size,file", [("8k", "env.json"), ("16k", "metrics.jsonl"), ("64k", "final.pt")])
def test_disk_full_during_a_run(size, file, mounts, cifar_shards, tmp_path, capsys):
    """A real full disk (tmpfs of `size`) at the first file that no longer fits; what was written stays readable."""
    fs = mounts(tmp_path / "fs", size=size)
    path = write(tmp_path / "c.yaml", config(cifar_shards))
    line = fails(["train", path, "--run-dir", fs / "run"], 8, capsys)
    assert f"cannot write {fs / 'run'}" in line and file in line
    assert "No space left on device (ENOSPC); free space or choose another --run-dir" in line
    assert yaml.safe_load((fs / "run" / "config.yaml").read_text())["seed"] == 0
    metrics = fs / "run" / "metrics.jsonl"
    if metrics.exists():  # every complete line is a record (a full disk may cut only the last one)
        lines = metrics.read_text().split("\n")[:-1]
        assert all(json.loads(x)["step"] >= 1 for x in lines)
    assert not list((fs / "run").glob(".*.tmp")) and not list((fs / "run").rglob(".*.tmp"))


def test_disk_full_under_tensorboard(mounts, cifar_shards, tmp_path, capsys):
    fs = mounts(tmp_path / "fs", size="16k")
    path = write(tmp_path / "c.yaml", config(cifar_shards, log={"tensorboard": True}))
    line = fails(["train", path, "--run-dir", fs / "run"], 8, capsys)
    assert "No space left on device (ENOSPC)" in line and str(fs / "run") in line


@pytest.mark.slow
def test_disk_full_under_tensorboard_as_a_real_process(mounts, cifar_shards, tmp_path):
    """The process boundary matters here: TensorBoard's writer thread dies first, and Python's default thread
    hook would print its traceback to the real stderr."""
    fs = mounts(tmp_path / "fs", size="16k")
    path = write(tmp_path / "c.yaml", config(cifar_shards, log={"tensorboard": True}))
    proc = run_harness("train", path, "--run-dir", fs / "run", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("harness: error: ")]
    assert proc.returncode == 8 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "No space left on device (ENOSPC)" in errors[0]


def test_read_only_file_system(mounts, cifar_shards, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    fs = mounts(tmp_path / "ro", bind_ro=tmp_path / "empty")
    path = write(tmp_path / "c.yaml", config(cifar_shards))
    line = fails(["train", path, "--run-dir", fs / "run"], 8, capsys)
    assert line == (f"harness: error: cannot write {fs / 'run'}: Read-only file system (EROFS); the file system is "
                    "mounted read-only; choose a writable --run-dir")


def in_the_way(tmp_path: Path) -> Path:
    """A sweep whose analysis/table.md is a directory holding a file of the user's."""
    autoencoder_sweep(tmp_path / "sweep")
    (tmp_path / "sweep" / "analysis" / "table.md").mkdir(parents=True)
    (tmp_path / "sweep" / "analysis" / "table.md" / "mine.txt").write_text("keep me\n")
    return tmp_path / "sweep"


def test_a_directory_where_an_output_file_goes(tmp_path, capsys):
    sweep = in_the_way(tmp_path)
    line = fails(["analyze", sweep, "--k", "2", "--n", "3"], 8, capsys)
    assert f"cannot use {sweep / 'analysis' / 'table.md'}: Is a directory (EISDIR)" in line
    assert (sweep / "analysis" / "table.md" / "mine.txt").read_text() == "keep me\n"
    assert not list((sweep / "analysis").glob(".*.tmp"))


def test_analyze_into_a_read_only_sweep_directory(mounts, tmp_path, capsys):
    autoencoder_sweep(tmp_path / "sweep")
    before = snapshot(tmp_path / "sweep")
    ro = mounts(tmp_path / "ro", bind_ro=tmp_path / "sweep")
    line = fails(["analyze", ro, "--k", "2", "--n", "3"], 8, capsys)
    assert "Read-only file system (EROFS)" in line and str(ro) in line
    assert snapshot(tmp_path / "sweep") == before


def test_data_synth_onto_a_read_only_file_system(mounts, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    ro = mounts(tmp_path / "ro", bind_ro=tmp_path / "empty")
    assert "Read-only file system (EROFS)" in fails(["data", "synth", "cifar10", ro / "c10"], 8, capsys)


def test_debug_keeps_the_exit_code_and_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--debug", "train", str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("harness: error: config file ")
    sweep = in_the_way(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["--debug", "analyze", str(sweep), "--k", "2", "--n", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 8 and "Traceback" in err and "IsADirectoryError" in err
    assert err.strip().splitlines()[-1].startswith("harness: error: cannot use ")


def test_a_non_zero_rank_says_its_own_os_error_but_not_a_shared_config_error(mounts, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        main(["train", str(tmp_path / "missing.yaml")])
    assert e.value.code == 2 and capsys.readouterr().err == ""  # every rank fails alike: rank 0 says it
    (tmp_path / "empty").mkdir()
    ro = mounts(tmp_path / "ro", bind_ro=tmp_path / "empty")
    line = fails(["data", "synth", "cifar10", ro / "c10"], 8, capsys)  # this rank's own write
    assert line.startswith(f"harness: error: rank 1: cannot write {ro / 'c10'}")


# ---------------------------------------------------------------------------------------------- metrics, results

NON_FINITE = ['{"step": Infinity, "train_loss": 1.0}', '{"step": NaN, "train_loss": 1.0}',
              '{"step": -Infinity}', '{"step": 100, "epoch": Infinity, "train_loss": 1.0}']


@pytest.mark.parametrize("line", NON_FINITE, ids=["inf", "nan", "-inf", "epoch-inf"])
def test_non_finite_numbers_in_metrics_do_not_break_analyze(line, tmp_path, capsys):
    autoencoder_sweep(tmp_path / "sweep")
    for metrics in (tmp_path / "sweep").rglob("metrics.jsonl"):
        metrics.write_text(metrics.read_text() + line + "\n")
    before = {p: p.read_bytes() for p in (tmp_path / "sweep").rglob("metrics.jsonl")}
    succeeds(["analyze", tmp_path / "sweep", "--k", "2", "--n", "3", "--curves-lr", "0.004,0.002"], capsys)
    assert (tmp_path / "sweep" / "analysis" / "curves.png").exists()
    assert {p: p.read_bytes() for p in before} == before


def test_non_finite_steps_on_resume_are_set_aside_not_lost(tmp_path, capsys):
    from harness.train.metrics_log import MetricsLog

    good = ['{"step": 10, "train_loss": 2.0}', '{"step": 20, "train_loss": NaN}', '{"step": 30, "train_loss": 1.0}']
    unreadable = [*NON_FINITE[:3], "[" * 100_000 + "]" * 100_000]
    (tmp_path / "metrics.jsonl").write_text("\n".join([good[0], *unreadable, *good[1:]]) + "\n")
    log = MetricsLog(tmp_path, enabled=True, tensorboard=False, resume_step=20)
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == good[:2]  # step 30 is replayed by the resume
    assert (tmp_path / "metrics.jsonl.unreadable").read_text().splitlines() == unreadable
    assert "4 line(s)" in capsys.readouterr().err


def test_deeply_nested_json_in_a_run_is_skipped_not_a_crash(tmp_path, capsys):
    autoencoder_sweep(tmp_path / "sweep")
    runs = sorted((tmp_path / "sweep").glob("*"))
    (runs[0] / "result.json").write_text("[" * 100_000 + "]" * 100_000)
    with open(runs[1] / "metrics.jsonl", "a") as f:
        f.write("[" * 100_000 + "]" * 100_000 + "\n")
    before = snapshot(tmp_path / "sweep")
    err = succeeds(["analyze", tmp_path / "sweep", "--k", "2", "--n", "3"], capsys)
    assert "result.json is nested too deeply" in err
    assert {k: v for k, v in snapshot(tmp_path / "sweep").items() if k in before} == before


@pytest.mark.parametrize("name", ["result.json", "config.yaml"])
def test_analyze_refuses_an_oversized_run_file_unread(name, tmp_path, capsys):
    autoencoder_sweep(tmp_path / "sweep")
    victim = sorted((tmp_path / "sweep").glob("*"))[0] / name
    with open(victim, "r+b") as f:
        f.truncate(2**30)  # sparse 1 GB: reading it whole took 2.1 GB of memory
    with pytest.raises(SystemExit) as e:
        main(["analyze", str(tmp_path / "sweep"), "--k", "2", "--n", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 0 and "Traceback" not in err
    assert f"{name} is 1,073,741,824 bytes, more than the 16,777,216" in err
    assert victim.stat().st_size == 2**30


@pytest.mark.parametrize("error,expected", [
    (ConnectionRefusedError(111, "Connection refused"), "cannot connect: Connection refused (ECONNREFUSED); check"),
    (BrokenPipeError(32, "Broken pipe"), "cannot write the output: Broken pipe (EPIPE)"),
    (PermissionError(13, "Permission denied", "/p/x"), "cannot use /p/x: Permission denied (EACCES); check its"),
    (OSError(122, "Disk quota exceeded", "/p/x"), "cannot write /p/x: Disk quota exceeded (EDQUOT); free space"),
], ids=["network", "pipe", "permissions", "quota"])
def test_os_errors_without_a_mount_to_stage_them(error, expected):
    """The errno families a test cannot stage as root (permissions, quotas) or without a network: their line."""
    from harness.core.errors import os_error_message

    assert os_error_message(error).startswith(expected)


def test_a_deeply_nested_deepspeed_json_is_a_config_error(tmp_path):
    from harness.core.errors import ConfigError
    from harness.recipe.batch_plan import make_batch_plan
    from harness.train.deepspeed_engine import deepspeed_config

    (tmp_path / "ds.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="nested too deeply to be a DeepSpeed config"):
        deepspeed_config(make_batch_plan(64, 1), "fp32", None, str(tmp_path / "ds.json"))
