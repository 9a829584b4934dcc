"""Readers: the in-memory reader's fast crop, the streaming reader's guarantees, and bad input for both."""

import shutil

import numpy as np
import pytest
import torch

from data_pipelines import ReaderOptions, build_data
from data_pipelines.augment import PaddedImages, crop_flip, crop_flip_params
from data_pipelines.shards import write_manifest, write_split
from harness.core.errors import DataError
from harness.recipe.batch_plan import make_batch_plan

CPU = torch.device("cpu")


def memory_source(path, kind="cifar10", skip=False):
    plan = make_batch_plan(64, 1, 64, ghost_batch_size=64)
    return build_data(kind, path, True, 100, plan, 0, 0, CPU, torch.float32, options(skip=skip))


def options(workers=0, resampled=False, skip=False, buffer=50, train_examples=None):
    return ReaderOptions(workers=workers, shuffle_buffer=buffer, resampled=resampled, image_size=32, eval_resize=36,
                         gpu_decode=False, skip_bad_samples=skip, train_examples=train_examples)


def stream(path, rank=0, world=1, workers=0, resampled=False, micro=16, accum=1, skip=False):
    plan = make_batch_plan(micro * world * accum, world, micro)
    return build_data("imagenet", path, True, 40, plan, 0, rank, CPU, torch.float32, options(workers, resampled, skip))


def copy(src, tmp_path):
    dest = tmp_path / "shards"
    shutil.copytree(src, dest)
    return dest


# --------------------------------------------------------------------------------------------- in-memory


@pytest.mark.parametrize("pad,flip", [(4, True), (1, False), (2, True)])
def test_padded_crop_equals_reference_gather(pad, flip):
    images = torch.randint(0, 256, (40, 3, 9, 7), dtype=torch.uint8)
    store = PaddedImages(images, pad, flip)
    keys = np.random.default_rng(pad).integers(0, 2**63, size=64).astype(np.uint64)
    dy, dx, fl = crop_flip_params(keys, pad, flip)
    index = torch.from_numpy(np.random.default_rng(1).integers(0, 40, size=64))
    assert torch.equal(store.crop(index, dy, dx, fl), crop_flip(images[index], dy, dx, fl, pad))
    assert torch.equal(store.images, images) and (fl.any() == flip)


def test_missing_path_suggests_the_convert_command(tmp_path):
    with pytest.raises(DataError, match=r"does not exist; create it with `harness data convert cifar10 cifar-10-python.tar.gz DIR`"):
        memory_source(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"`harness data convert imagenet ILSVRC2012_DIR DIR`"):
        stream(tmp_path / "nowhere")


def test_truncated_or_corrupt_shard_is_named(tmp_path, cifar_shards):
    dest = copy(cifar_shards, tmp_path)
    shard = dest / "train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"shard {shard} is truncated or corrupt .* re-run the conversion"):
        memory_source(dest)
    shard.write_bytes(data[:5000] + bytes([data[5000] ^ 0xFF]) + data[5001:])  # same size, one byte flipped
    with pytest.raises(DataError, match=f"shard {shard} fails its checksum"):
        memory_source(dest)


def test_skip_bad_samples_in_memory(tmp_path, cifar_shards, capfd):
    dest = copy(cifar_shards, tmp_path)
    shard = dest / "train-000002.tar"  # the last 112 of 512 examples
    shard.write_bytes(shard.read_bytes()[:20000])
    src = memory_source(dest, skip=True)
    assert 400 <= src.spec.num_train < 512
    err = capfd.readouterr().err
    assert f"left out {512 - src.spec.num_train} of the 512 train examples" in err and "train-000002.tar" in err


def write_bad_labels(dest, label):
    """A 2-class dataset whose training example 3 has label `label`, with valid checksums."""
    dest.mkdir()

    def gen(start, stop):
        for i in range(start, stop):
            yield {"__key__": f"{i:08d}", "png": np.full((4, 4), i, dtype=np.uint8), "cls": label if i == 3 else i % 2}

    splits = {s: write_split(dest, s, gen, 8, 8) for s in ("train", "test")}
    write_manifest(dest, {"kind": "digits", "task": "classification", "image_shape": [1, 4, 4], "classes": ["a", "b"],
                          "mean": [0.5], "std": [0.2], "splits": splits})


def test_label_out_of_range_and_empty_split(tmp_path, capfd):
    write_bad_labels(tmp_path / "bad", 7)
    with pytest.raises(DataError, match="sample 00000003 of shard .*train-000000.tar: label 7 is outside 0..1"):
        memory_source(tmp_path / "bad", kind="digits")
    src = memory_source(tmp_path / "bad", kind="digits", skip=True)
    assert src.spec.num_train == 7 and "left out 1 of the 8 train examples" in capfd.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    write_manifest(empty, {"kind": "digits", "task": "classification", "image_shape": [1, 4, 4], "classes": ["a", "b"],
                           "mean": [0.5], "std": [0.2], "splits": {"train": {"size": 0, "shards": []},
                                                                   "test": {"size": 0, "shards": []}}})
    with pytest.raises(DataError, match="the 'train' split in .* is empty"):
        memory_source(empty, kind="digits")


# --------------------------------------------------------------------------------------------- streaming


def epoch_keys(src, steps):
    return [k for s in range(steps) for _, _, k in src.train_micro_batches(s, keys=True)]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_partitions_epochs_and_eval_over_ranks(imagenet_shards, workers):
    """W = 2 ranks (built in one process: the reader needs only its rank), K workers each, not resampled."""
    ranks = [stream(imagenet_shards, rank=r, world=2, workers=workers) for r in range(2)]
    per_epoch = ranks[0].per_epoch
    assert [r.per_epoch for r in ranks] == [per_epoch] * 2 and per_epoch == 8  # 256 // (2 x max(K, 1)) // 16 x K
    for epoch in range(2):
        keys = [torch.cat(epoch_keys(r, per_epoch * (epoch + 1))[per_epoch * epoch:]) for r in ranks]
        assert [len(k) for k in keys] == [per_epoch * 16] * 2
        everything = torch.cat(keys).tolist()
        assert sorted(everything) == list(range(256))  # each example exactly once per epoch over ranks
    evaluated = [torch.cat([k for _, _, k in r.eval_batches(keys=True)]) for r in ranks]
    assert sorted(torch.cat(evaluated).tolist()) == list(range(96)) and abs(len(evaluated[0]) - len(evaluated[1])) <= 40


def test_seek_sample_lands_on_each_sample(imagenet_shards):
    import webdataset as wds

    from data_pipelines.stream import seek_sample

    path = imagenet_shards / "val-000001.tar"  # 32 samples
    keys = [s["__key__"] for s in wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(
        [{"url": str(path), "stream": open(path, "rb")}]))]
    for n in (1, 7, 31):
        with open(path, "rb") as f:
            assert seek_sample(f, n)
            rest = wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander([{"url": str(path), "stream": f}]))
            assert [s["__key__"] for s in rest] == keys[n:]
    with open(path, "rb") as f:
        assert not seek_sample(f, 32)  # past the end: the caller falls back to reading


def test_stream_is_deterministic_and_resumes_exactly(imagenet_shards):
    for resampled in (False, True):
        ref = stream(imagenet_shards, workers=2, resampled=resampled, accum=2)  # 8 steps = one epoch of 16
        batches = {s: list(ref.train_micro_batches(s, keys=True)) for s in range(11)}
        resumed = stream(imagenet_shards, workers=2, resampled=resampled, accum=2)
        for s in (5, 6, 7, 8, 9, 10):  # mid-epoch, at an odd worker offset, across the epoch boundary
            for (x, y, k), (x2, y2, k2) in zip(batches[s], resumed.train_micro_batches(s, keys=True)):
                assert torch.equal(k, k2) and torch.equal(y, y2) and torch.equal(x, x2)
        first = torch.cat([k for s in range(8) for _, _, k in batches[s]])
        assert (len(set(first.tolist())) == 256) == (not resampled)
        # Augmentation happens: a crop of the same example differs across epochs.
        assert not torch.equal(batches[0][0][0], batches[8][0][0])


def test_stream_errors_name_the_shard(imagenet_shards, tmp_path, capfd):
    dest = copy(imagenet_shards, tmp_path)
    shard = dest / "train-000002.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:-3000])
    with pytest.raises(DataError, match=f"shard {shard} is truncated or corrupt .* manifest says {len(data)}"):
        stream(dest)
    # Same size, corrupt in the middle: found while streaming, in a worker process, reported as one line.
    shard.write_bytes(data[:40000] + bytes(5000) + data[45000:])
    src = stream(dest, workers=2)
    with pytest.raises(DataError) as e:
        for s in range(src.per_epoch):
            list(src.train_micro_batches(s))
    assert str(shard) in str(e.value) and "\n" not in str(e.value) and "re-run the conversion" in str(e.value)
    # skip_bad_samples: the rest is used, and the count is logged.
    src = stream(dest, workers=2, skip=True)
    for s in range(src.per_epoch + 1):
        assert all(len(y) == 16 for _, y in src.train_micro_batches(s))
    err = capfd.readouterr().err
    assert "bad samples in training epoch 0 (data.skip_bad_samples)" in err and str(shard) in err


def test_stream_label_out_of_range(tmp_path):
    from data_pipelines.imagenet import Items, synthetic_jpeg, write_jpeg_dataset

    labels = np.array([0, 1, 2, 1] * 8)
    labels[5] = 9
    items = Items([f"x{i}" for i in range(32)], labels, lambda i: synthetic_jpeg(0, "train", i, int(labels[i] % 3), 3))
    write_jpeg_dataset("imagenet", tmp_path / "s", {"train": items, "val": items}, ["a", "b", "c"], "fp", shard_size=16)
    with pytest.raises(DataError, match="sample 00000005 of shard .*train-000000.tar: label 9 is outside 0..2"):
        src = stream(tmp_path / "s", micro=8)
        for s in range(src.per_epoch):
            list(src.train_micro_batches(s))


def decoded(shards, device: str, workers: int) -> dict:
    """The first training and evaluation batches, decoded in the workers (False) and deferred (True)."""
    plan = make_batch_plan(16, 1, 16)
    batches, sources = {}, {}
    for deferred in (False, True):
        opts = ReaderOptions(workers=workers, shuffle_buffer=50, resampled=False, image_size=32, eval_resize=36,
                             gpu_decode=deferred, skip_bad_samples=False)
        src = build_data("imagenet", shards, True, 40, plan, 0, 0, torch.device(device), torch.float32, opts)
        batches[deferred] = (next(iter(src.train_micro_batches(0, keys=True))), next(iter(src.eval_batches(keys=True))))
        sources[deferred] = src
    return batches, sources


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvjpeg)")
def test_gpu_decode_matches_cpu_decode(imagenet_shards):
    batches, _ = decoded(imagenet_shards, "cuda", 0)
    for (x, y, k), (x2, y2, k2) in zip(batches[False], batches[True]):
        assert x2.is_cuda and x.shape == x2.shape and torch.equal(k, k2) and torch.equal(y, y2)
        # Same crops; nvjpeg's IDCT differs from libjpeg-turbo's by a few levels.
        assert (x - x2).abs().mean() < 0.1


def test_deferred_decode_matches_worker_decode_and_ships_one_tensor_per_batch(imagenet_shards):
    """data.gpu_decode moves decoding from the loader workers to the training process (nvjpeg on a GPU; here the
    CPU path of the same code): the same images; and each batch crosses from a worker as ONE tensor of JPEG
    bytes, not one tensor (one shared-memory file descriptor) per image."""
    batches, sources = decoded(imagenet_shards, "cpu", 2)
    (data, lengths, _, _), labels = next(iter(sources[True].train_loader))[:2]
    assert data.dtype == torch.uint8 and data.dim() == 1 and len(lengths) == len(labels) == 16
    assert int(lengths.sum()) == len(data)
    for (x, y, k), (x2, y2, k2) in zip(batches[False], batches[True]):
        assert torch.equal(k, k2) and torch.equal(y, y2) and torch.equal(x, x2)


def test_reader_config_keys_are_strict():
    from harness.core.errors import ConfigError
    from harness.train.config import load_config

    cfg = load_config(None, ["data.path=x", "budget.steps=1", "data.workers=0", "data.resampled=false", "data.image_size=32",
                             "data.eval_resize=36"])
    assert ReaderOptions.of(cfg.data) == ReaderOptions(0, 2000, False, 32, 36, False, False)
    for bad, message in [("data.workers=-1", "must be >= 0"), ("data.resampled=maybe", "expected bool"),
                         ("data.eval_resize=200", "must be >= data.image_size"), ("data.shuffle_bufer=5", "shuffle_buffer")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["data.path=x", "budget.steps=1", bad])


# --------------------------------------------------------------------------------------------- held-out split


def test_train_examples_is_a_fixed_held_out_split(digits_shards):
    """data.train_examples: N: the first N of one permutation drawn from a fixed seed, whatever the run's seed;
    epochs count N examples; the rest is never read."""
    from data_pipelines.memory import held_out_split

    plan = make_batch_plan(64, 1, 64)
    full = build_data("digits", digits_shards, False, 100, plan, 0, 0, CPU, torch.float32, options())
    subsets = []
    for seed in (0, 7):
        src = build_data("digits", digits_shards, False, 100, plan, seed, 0, CPU, torch.float32,
                         options(train_examples=1000))
        assert src.spec.num_train == 1000 and len(src.train_y) == 1000 and src.spec.num_test == full.spec.num_test
        subsets.append(src.train_x)
        kept = held_out_split(full.spec.num_train, 1000)
        assert torch.equal(src.train_x, full.train_x[torch.from_numpy(kept)])  # those examples, in key order
        idx, _ = src.order.lookup(0, 2000)  # two epochs of the run's stream: only the N kept examples
        assert sorted(set(idx.tolist())) == list(range(1000))
    assert torch.equal(subsets[0], subsets[1])  # independent of the run seed
    assert len(set(held_out_split(1347, 1000)) - set(held_out_split(1347, 1200))) == 0  # N' > N contains N
    assert not np.array_equal(held_out_split(1347, 1000), np.arange(1000))  # a permutation, not the first keys


def test_train_examples_validation_is_one_line(digits_shards):
    from harness.core.errors import ConfigError
    from harness.train.config import load_config

    plan = make_batch_plan(64, 1, 64)
    with pytest.raises(ConfigError) as e:
        build_data("digits", digits_shards, False, 100, plan, 0, 0, CPU, torch.float32, options(train_examples=5000))
    assert "data.train_examples: 5000 is not in 1 .. 1347" in str(e.value) and "\n" not in str(e.value)
    for bad, message in [("data.train_examples=0", "must be > 0"),
                         ("data.name=ptb", "train_examples: only for the in-memory datasets")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["data.path=x", "budget.steps=1", "data.train_examples=10", bad])


def test_train_examples_is_science_and_sets_the_epoch(digits_shards):
    """It is recorded in the resolved config and changes the run id (not a layout key); budget.epochs counts N."""
    from harness.core import configlib
    from harness.core.keys import run_id
    from harness.sweep.cost import run_steps
    from harness.train.config import load_config

    base = [f"data.path={digits_shards}", "budget.epochs=2", "batch.global_batch_size=100"]
    whole, held = (configlib.to_dict(load_config(None, base + extra)) for extra in ([], ["data.train_examples=1000"]))
    assert held["data"]["train_examples"] == 1000 and whole["data"]["train_examples"] is None
    assert run_id(whole) != run_id(held)
    assert run_steps(held) == (20, 2.0) and run_steps(whole)[0] == 26  # 2 x 1000 / 100; 2 x 1347 // 100


def test_a_run_on_a_held_out_split_trains_its_epochs_of_n(tmp_path, digits_shards):
    import json

    from tests.conftest import run_harness

    run_harness("train", "yaml/digits_mlp.yaml", "--set", f"data.path={digits_shards}", "budget.steps=null",
                "budget.epochs=1", "batch.global_batch_size=100", "data.train_examples=1000", "eval.every_steps=null",
                "eval.every_epochs=null", "--run-dir", tmp_path / "run")
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["steps"] == 10 and result["epochs"] == 1.0  # one epoch of the 1000 kept examples
    assert "train_examples: 1000" in (tmp_path / "run" / "config.yaml").read_text()
