"""`harness data convert` from fakes of each standard distribution in its exact on-disk format: manifests match
the inputs, re-runs keep verified shards, bad input gets a one-line error naming the file and the fix."""

import argparse
import gzip
import json
import os
import shutil
import sys
import tarfile

import numpy as np
import pytest
import torch

from data_pipelines.cli import cmd_data_verify
from data_pipelines.convert import convert
from data_pipelines.memory import load_split
from data_pipelines.shards import PARTIAL, read_manifest
from data_pipelines.tokens import load_tokens
from harness.core.errors import DataError
from tests import fakes
from tests.conftest import run_harness


def shard_mtimes(dest):
    return {p.name: p.stat().st_mtime_ns for p in dest.glob("*.tar")}


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_tarball(tmp_path, kind):
    src = tmp_path / f"{kind}-python.tar.gz"
    expect = fakes.cifar_tarball(src, kind)
    dest = tmp_path / "shards"
    m = convert(kind, src, dest, shard_size=40)
    assert m["kind"] == kind and m["classes"] == expect["classes"] and m["image_shape"] == [3, 32, 32]
    assert m["splits"]["train"]["size"] == expect["train"] == 100 and m["splits"]["test"]["size"] == expect["test"]
    assert [s["count"] for s in m["splits"]["train"]["shards"]] == [40, 40, 20]
    assert [s["name"] for s in m["splits"]["test"]["shards"]] == ["test-000000.tar"]
    x, y = load_split(dest, read_manifest(dest, kind), "train")
    assert np.array_equal(x[0].permute(1, 2, 0).numpy(), expect["first_train_image"])  # channel layout kept
    assert y[0] == expect["first_train_label"] and y.max() == len(expect["classes"]) - 1
    assert 0.4 < m["mean"][0] < 0.6 and 0.25 < m["std"][0] < 0.35  # uniform random pixels

    # The extracted folder gives the same shards.
    with tarfile.open(src) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    folder = next((tmp_path / "x").iterdir())
    m2 = convert(kind, folder, tmp_path / "shards2", shard_size=40)
    assert [s["sha256"] for s in m2["splits"]["train"]["shards"]] == [s["sha256"] for s in m["splits"]["train"]["shards"]]


def test_rerun_keeps_verified_shards_and_rewrites_bad_ones(tmp_path):
    src = tmp_path / "cifar-10-python.tar.gz"
    fakes.cifar_tarball(src)
    dest = tmp_path / "shards"
    first = convert("cifar10", src, dest, shard_size=40)
    before = shard_mtimes(dest)
    again = run_harness("data", "convert", "cifar10", src, dest, "--shard-size", "40")
    assert "train: 100 in 3 shards" in again.stdout
    assert shard_mtimes(dest) == before  # complete, verified shards are kept
    assert cmd_data_verify(argparse.Namespace(dir=str(dest))) == 0
    # A truncated shard is rewritten; the others are kept.
    bad = dest / "train-000001.tar"
    bad.write_bytes(bad.read_bytes()[:5000])
    with pytest.raises(DataError, match=f"shard {bad} is truncated or corrupt"):
        cmd_data_verify(argparse.Namespace(dir=str(dest)))
    assert convert("cifar10", src, dest, shard_size=40) == first
    after = shard_mtimes(dest)
    assert after["train-000001.tar"] != before["train-000001.tar"]
    assert {k: v for k, v in after.items() if k != "train-000001.tar"} == {k: v for k, v in before.items() if k != "train-000001.tar"}


def test_interrupted_conversion_resumes(tmp_path, monkeypatch):
    import data_pipelines.writer as conv

    src = tmp_path / "cifar-10-python.tar.gz"
    fakes.cifar_tarball(src)
    dest = tmp_path / "shards"
    calls = {"n": 0}
    original = conv.write_split

    def dying(dest_, split, samples, size, per_shard, previous=None, progress=None, bounds=None, on_shard=None):
        def interrupt(entry):
            on_shard(entry)
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
        return original(dest_, split, samples, size, per_shard, previous, progress, bounds, interrupt)

    monkeypatch.setattr(conv, "write_split", dying)
    with pytest.raises(KeyboardInterrupt):
        convert("cifar10", src, dest, shard_size=40)
    assert not (dest / "manifest.json").exists() and (dest / PARTIAL).exists()
    done = shard_mtimes(dest)
    assert sorted(done) == ["train-000000.tar", "train-000001.tar"]
    monkeypatch.setattr(conv, "write_split", original)
    m = convert("cifar10", src, dest, shard_size=40)
    assert {k: v for k, v in shard_mtimes(dest).items() if k in done} == done
    assert m["splits"]["train"]["size"] == 100 and not (dest / PARTIAL).exists()


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path, gz):
    expect = fakes.mnist_files(tmp_path / "mnist", gz=gz)
    dest = tmp_path / "shards"
    m = convert("mnist", tmp_path / "mnist", dest)
    assert m["kind"] == "mnist" and m["image_shape"] == [1, 28, 28] and m["classes"] == [str(i) for i in range(10)]
    assert (m["splits"]["train"]["size"], m["splits"]["test"]["size"]) == (expect["train"], expect["test"])
    names = tarfile.open(dest / "train-000000.tar").getnames()
    assert sorted(names[:2]) == ["00000000.cls", "00000000.png"]
    x, y = load_split(dest, read_manifest(dest, "mnist"), "train")  # the in-memory reader reads them
    assert x.shape == (60, 1, 28, 28) and np.array_equal(x[0, 0].numpy(), expect["first_train_image"])
    assert y[0] == expect["first_train_label"]


def test_ptb_text(tmp_path):
    expect = fakes.ptb_files(tmp_path / "ptb")
    dest = tmp_path / "shards"
    m = convert("ptb", tmp_path / "ptb", dest)
    assert m["kind"] == "ptb" and m["task"] == "language_model" and m["vocab_size"] == expect["vocab"]
    assert {s: m["splits"][s]["size"] for s in ("train", "valid", "test")} == expect["tokens"]
    manifest = read_manifest(dest, "ptb")
    train = load_tokens(dest, manifest, "train")
    words = [manifest["vocab"][i] for i in train.tolist()]
    first_line = (tmp_path / "ptb" / "ptb.train.txt").read_text().splitlines()[0].split()
    assert words[: len(first_line) + 1] == first_line + ["<eos>"]  # Zaremba: <eos> ends every line
    first_words = list(dict.fromkeys(first_line))
    assert manifest["vocab"][: len(first_words)] == first_words  # ids in order of first appearance (data.lua)
    before = shard_mtimes(dest)
    convert("ptb", tmp_path / "ptb", dest)
    assert shard_mtimes(dest) == before


@pytest.mark.parametrize("val", ["folders", "csv", "txt"])
def test_imagenet_tree(tmp_path, val):
    expect = fakes.imagenet_tree(tmp_path / "ilsvrc", val=val)
    dest = tmp_path / "shards"
    m = convert("imagenet", tmp_path / "ilsvrc", dest, shard_bytes=12_000)
    assert m["classes"] == expect["classes"] and m["eval_split"] == "val"
    assert (m["splits"]["train"]["size"], m["splits"]["val"]["size"]) == (expect["train"], expect["val"])
    assert len(m["splits"]["train"]["shards"]) > 2  # cut by bytes
    assert sorted(os.path.basename(p) for p in m["reencoded"]) == ["n01440764_0.JPEG", "n01440764_1.JPEG"]  # CMYK, PNG
    labels, keys = [], []
    for shard in m["splits"]["val"]["shards"]:
        with tarfile.open(dest / shard["name"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".cls"):
                    labels.append(int(tar.extractfile(member).read()))
                else:
                    keys.append(member.name)
                    assert tar.extractfile(member).read()[:3] == b"\xff\xd8\xff"  # JPEG bytes
    assert labels == sorted(labels) and np.bincount(labels).tolist() == [4, 4, 4]  # val files sorted by name
    train_labels = []
    for shard in m["splits"]["train"]["shards"]:
        with tarfile.open(dest / shard["name"]) as tar:
            train_labels += [int(tar.extractfile(x).read()) for x in tar.getmembers() if x.name.endswith(".cls")]
    assert np.bincount(train_labels).tolist() == [10, 10, 10] and train_labels != sorted(train_labels)  # shuffled once
    before = shard_mtimes(dest)
    assert convert("imagenet", tmp_path / "ilsvrc", dest, shard_bytes=12_000) == m and shard_mtimes(dest) == before


# --------------------------------------------------------------------------------------------- bad input


def converted_error(*args) -> str:
    proc = run_harness("data", "convert", *args, check=False)
    assert proc.returncode == 4, proc.stderr
    lines = proc.stderr.strip().splitlines()  # (a progress bar may precede it in a log)
    assert lines[-1].startswith("harness: error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert sum("harness: error" in line for line in lines) == 1
    return lines[-1]


def test_missing_source_names_the_expected_files(tmp_path):
    line = converted_error("cifar10", tmp_path / "nope.tar.gz", tmp_path / "out")
    assert "nope.tar.gz does not exist" in line and "cifar-10-python.tar.gz" in line
    with pytest.raises(DataError, match="has no ptb.train.txt; pass a folder holding ptb.train.txt"):
        convert("ptb", tmp_path, tmp_path / "out")
    (tmp_path / "mnist").mkdir()
    with pytest.raises(DataError, match="has no train-images-idx3-ubyte"):
        convert("mnist", tmp_path / "mnist", tmp_path / "out")


def test_truncated_or_wrong_sources(tmp_path):
    src = tmp_path / "cifar-10-python.tar.gz"
    fakes.cifar_tarball(src)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.tar.gz is not a readable tar.gz .* download it again"):
        convert("cifar10", cut, tmp_path / "out")
    with pytest.raises(DataError, match="not the cifar100 python tarball"):
        convert("cifar100", src, tmp_path / "out")
    fakes.mnist_files(tmp_path / "mnist")
    labels = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes())[:-5]))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz holds 35 data bytes .* truncated"):
        convert("mnist", tmp_path / "mnist", tmp_path / "out")


def test_labels_out_of_range(tmp_path):
    fakes.mnist_files(tmp_path / "mnist", gz=False)
    path = tmp_path / "mnist" / "train-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[8 + 3] = 12
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: label 12 is outside 0..9"):
        convert("mnist", tmp_path / "mnist", tmp_path / "out")
    fakes.imagenet_tree(tmp_path / "inet", val="txt")
    (tmp_path / "inet" / "val.txt").write_text("ILSVRC2012_val_00000001.JPEG 7\n")
    with pytest.raises(DataError, match="val.txt: label '7' of ILSVRC2012_val_00000001.JPEG .* 0..2"):
        convert("imagenet", tmp_path / "inet", tmp_path / "out")


def test_empty_split(tmp_path):
    fakes.ptb_files(tmp_path / "ptb")
    (tmp_path / "ptb" / "ptb.valid.txt").write_text("")
    with pytest.raises(DataError, match="ptb.valid.txt is empty"):
        convert("ptb", tmp_path / "ptb", tmp_path / "out")
    fakes.imagenet_tree(tmp_path / "inet")
    for f in (tmp_path / "inet" / "val").rglob("*.JPEG"):
        f.unlink()
    with pytest.raises(DataError, match="the 'val' split of the imagenet source is empty"):
        convert("imagenet", tmp_path / "inet", tmp_path / "out")


def test_imagenet_bad_inputs(tmp_path):
    fakes.imagenet_tree(tmp_path / "inet", val="csv")
    (tmp_path / "inet" / "LOC_val_solution.csv").unlink()
    with pytest.raises(DataError, match="has no class folders and no label file .* pass --val-labels"):
        convert("imagenet", tmp_path / "inet", tmp_path / "out")
    fakes.imagenet_tree(tmp_path / "inet2")
    bad = tmp_path / "inet2" / "train" / "n01441764" / "n01441764_3.JPEG"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated JPEG
    line = converted_error("imagenet", tmp_path / "inet2", tmp_path / "out")
    assert str(bad) in line and "--skip-bad" in line
    m = convert("imagenet", tmp_path / "inet2", tmp_path / "out", skip_bad=True)
    assert m["skipped"] == [str(bad)] and m["splits"]["train"]["size"] == 29
    # Skipped at conversion: the keys of the remaining images are unique.
    keys = []
    for shard in m["splits"]["train"]["shards"]:
        keys += [n for n in tarfile.open(tmp_path / "out" / shard["name"]).getnames() if n.endswith(".jpg")]
    assert len(set(keys)) == 29
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["train"]["size"] == 29


# --------------------------------------------------------------------------------------------- MNIST-1D


def test_mnist1d_is_the_generators_dataset_as_float_signals(tmp_path, mnist1d_shards):
    """`harness data convert mnist1d - DIR`: the package's default dataset (4000 train / 1000 test signals of
    length 40), stored exactly as float32 (1, 1, 40) signals, without touching numpy's global generator."""
    from mnist1d.data import get_dataset_args, make_dataset

    m = read_manifest(mnist1d_shards, "mnist1d")
    assert m["image_shape"] == [1, 1, 40] and m["dtype"] == "float32" and m["classes"] == [str(i) for i in range(10)]
    assert (m["splits"]["train"]["size"], m["splits"]["test"]["size"]) == (4000, 1000)
    assert m["generator_args"]["seed"] == 42 and "mnist1d==" in m["source"]
    assert sorted(tarfile.open(mnist1d_shards / "train-000000.tar").getnames()[:2]) == ["00000000.cls", "00000000.npy"]
    expect = make_dataset(get_dataset_args())
    for split, xk, yk in (("train", "x", "y"), ("test", "x_test", "y_test")):
        x, y = load_split(mnist1d_shards, m, split)
        assert x.dtype == torch.float32 and x.shape == (len(expect[yk]), 1, 1, 40)
        assert np.array_equal(x[:, 0, 0].numpy(), expect[xk].astype(np.float32)) and np.array_equal(y.numpy(), expect[yk])
    # The manifest's mean and std are of the raw values (the generator centres them and scales them to std 1).
    assert abs(m["mean"][0]) < 0.01 and abs(m["std"][0] - 1) < 0.01
    np.random.seed(0)
    state, before = np.random.get_state()[1].copy(), shard_mtimes(mnist1d_shards)
    again = convert("mnist1d", "-", mnist1d_shards)  # a re-run keeps the verified shards, and the caller's generator
    assert again["fingerprint"] == m["fingerprint"] and shard_mtimes(mnist1d_shards) == before
    assert np.array_equal(np.random.get_state()[1], state)


def test_mnist1d_bad_input_is_one_line(tmp_path, monkeypatch, mnist1d_shards):
    line = converted_error("mnist1d", tmp_path / "mnist1d_data.pkl", tmp_path / "out")
    assert "mnist1d is generated, not read: pass '-' as SRC" in line and "harness data convert mnist1d - DIR" in line
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)  # as if the package were not installed
    with pytest.raises(DataError, match=r"install it: pip install mnist1d==0\.0\.2\.post1"):
        convert("mnist1d", "-", tmp_path / "out")
    # Shards whose values are not the manifest's type, or a manifest type the reader does not know.
    dest = tmp_path / "shards"
    shutil.copytree(mnist1d_shards, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    for dtype, message in (("uint8", "values of type float32, the manifest says uint8"),
                           ("float16", "dtype 'float16' is not one of uint8, float32")):
        (dest / "manifest.json").write_text(json.dumps({**manifest, "dtype": dtype}))
        with pytest.raises(DataError, match=message) as e:
            load_split(dest, read_manifest(dest, "mnist1d"), "test")
        assert "\n" not in str(e.value)
