"""The fake-CUDA tier, the branches taken only on a GPU (torch.cuda.is_available() or device.type == "cuda"):
each runs on fake cuda:0 with test doubles of the torch.cuda (and process-group) calls, which record what would
be called with which arguments and check those arguments against what the real functions accept."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch
import torch.distributed as dist

from harness.train import checkpoint, distributed, numerics
from tests.fake_cuda import FakeCuda
from tests.test_fake_cuda_train import assert_gpu_path, fake_config, fake_train

pytestmark = pytest.mark.fake_cuda
CUDA0 = torch.device("cuda", 0)


def test_checkpoint_rng_state_saves_and_restores_the_cuda_generator(tmp_path):
    """rng_state() adds the CUDA generator's state on a GPU; set_rng_state() hands torch.cuda.set_rng_state the
    CPU ByteTensor it requires, whatever the loaded tensor became (map_location=cuda, another dtype)."""
    with FakeCuda() as fc:
        state = checkpoint.rng_state()
        assert set(state) == {"cpu", "cuda"}
        loaded = {"cpu": state["cpu"], "cuda": torch.zeros(16, dtype=torch.int64, device="cuda")}
        checkpoint.set_rng_state(loaded)
    (_, (new_state,), _, _), = fc.cuda.named("set_rng_state")  # the double checked: a CPU ByteTensor
    assert new_state.device.type == "cpu" and new_state.dtype == torch.uint8 and new_state.shape == (16,)
    assert fc.cuda.named("get_rng_state")
    # A real save and load of the same payload (CPU tensors: what Checkpointer.load_latest returns) restores too.
    ck = checkpoint.Checkpointer(tmp_path, keep=1, is_main=True)
    ck.save(1, {"rng": state})
    payload, _ = ck.load_latest()
    with FakeCuda() as fc:
        checkpoint.set_rng_state(payload["rng"])
    assert len(fc.cuda.named("set_rng_state")) == 1


@pytest.mark.parametrize("precision, deterministic", [("fp32", False), ("tf32", True)])
def test_math_mode_on_cuda(precision, deterministic, monkeypatch):
    """On a GPU: cuDNN autotuning unless deterministic; deterministic sets CUBLAS_WORKSPACE_CONFIG (read when
    cuBLAS starts) and promises a bitwise resume; TF32 only when asked."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        mode = numerics.configure(precision, deterministic, CUDA0)
        assert mode["cudnn_benchmark"] is (not deterministic) and torch.backends.cudnn.benchmark is (not deterministic)
        assert torch.backends.cuda.matmul.fp32_precision == ("tf32" if precision == "tf32" else "ieee")
        assert torch.backends.cudnn.conv.fp32_precision == mode["fp32_math"]
        assert (os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8") is deterministic
        assert mode["resume_promise"].startswith("bitwise" if deterministic else "statistical")
    finally:
        numerics.configure("fp32", False, torch.device("cpu"))


class ProcessGroupDouble:
    """dist.rendezvous and dist.init_process_group: record the backend and device a rank would ask for."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(dist, "rendezvous", lambda url, timeout=None: iter([(dist.HashStore(), 1, 4)]))
        monkeypatch.setattr(dist, "init_process_group", lambda **kw: self.calls.append(kw))
        monkeypatch.setattr(dist, "is_initialized", lambda: False)


@pytest.mark.parametrize("device, local_rank, devices, want", [("cuda", "1", 2, 1), ("auto", "5", 4, 1),
                                                               ("cuda", "0", 1, 0)])
def test_setup_picks_the_local_rank_gpu_and_nccl(device, local_rank, devices, want, monkeypatch):
    """Rank 1 of 4 (LOCAL_RANK, as torchrun sets it): cuda:LOCAL_RANK mod GPUs, and the nccl backend with that
    device (device_id: an eager NCCL communicator bound to it)."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    groups = ProcessGroupDouble(monkeypatch)
    with FakeCuda() as fc:
        fc.cuda.devices = devices
        env = distributed.setup(device)
    assert env.device == torch.device("cuda", want) and env.world_size == 4
    assert [c[1] for c in fc.cuda.named("set_device")] == [(want,)]
    (kw,) = groups.calls
    assert kw["backend"] == "nccl" and kw["device_id"] == torch.device("cuda", want) and kw["world_size"] == 4


def test_deepspeed_one_process_group_is_nccl_on_cuda(monkeypatch):
    groups = ProcessGroupDouble(monkeypatch)
    distributed.ensure_process_group(CUDA0)
    (kw,) = groups.calls
    assert kw["backend"] == "nccl" and kw["device_id"] == CUDA0 and kw["world_size"] == 1


def test_device_cuda_without_a_gpu_is_a_config_error():
    from harness.core.errors import ConfigError

    with pytest.raises(ConfigError, match="no GPU is visible"):
        distributed.setup("cuda")  # outside FakeCuda: the truth of this machine


def test_each_local_sweep_worker_gets_its_own_gpu(monkeypatch):
    """The local executor's workers: worker k trains on GPU k mod (visible GPUs), through LOCAL_RANK."""
    from harness.sweep.local import assign_device

    counter = multiprocessing.get_context("spawn").Value("i", 0)
    seen = []
    with FakeCuda() as fc:
        fc.cuda.devices = 4
        for _ in range(6):
            monkeypatch.setenv("LOCAL_RANK", "x")
            assign_device(counter, torch.cuda.device_count())
            monkeypatch.setenv("WORLD_SIZE", "1")
            seen.append(distributed.setup("auto").device.index)
    assert seen == [0, 1, 2, 3, 0, 1]


def test_device_order_uploads_each_permutation_pinned_and_asynchronously():
    from data_pipelines.order import DeviceOrder

    with FakeCuda() as fc:
        order = DeviceOrder(100, seed=0, device="cuda")
        index, epochs = order.lookup(90, 130)  # two epochs: two uploads, then slices on the device
        order.lookup(95, 105)
    assert index.device == CUDA0 and epochs.device == CUDA0 and index.shape == (40,)
    assert [r.kind for r in fc.records] == ["pin_memory", "async cpu->cuda copy"] * 2, fc.describe(fc.records)


def test_streaming_reader_decodes_on_the_gpu(monkeypatch, tmp_path, imagenet_shards):
    """data.gpu_decode: the loader workers send the JPEG bytes (pinned), the training process decodes them with
    nvjpeg (torchvision.io.decode_jpeg(list of CPU uint8 tensors, device=cuda)), crops, flips and normalizes
    on the GPU. The double of decode_jpeg checks that call and decodes on the CPU for the images' sizes; what
    follows nvjpeg runs as on a GPU. Not exercised: nvjpeg itself."""
    import torchvision.io

    real_decode, calls = torchvision.io.decode_jpeg, []

    def decode_jpeg(inputs, mode=None, device="cpu", **kw):
        assert isinstance(inputs, list) and all(t.device.type == "cpu" and t.dtype == torch.uint8 and t.dim() == 1
                                                for t in inputs), "decode_jpeg takes a list of 1-D uint8 CPU tensors"
        assert torch.device(device).type == "cuda", device
        calls.append(len(inputs))
        # nvjpeg writes the images on the device: no host-to-device copy (the fake images need no values).
        return [torch.empty(img.shape, dtype=img.dtype, device=device) for img in real_decode(inputs, mode=mode)]

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    cfg = fake_config(imagenet_shards, "imagenet", "model.name=resnet", "model.depth=18", "model.width=8",
                      "model.ghost_batch_size=8", "data.image_size=32", "data.eval_resize=36", "data.workers=0",
                      "data.gpu_decode=true", "batch.global_batch_size=16", "data.eval_batch_size=48", "precision=bf16")
    fc, result, _ = fake_train(monkeypatch, cfg, tmp_path / "run")
    assert_gpu_path(fc, result, cfg)
    assert calls and set(calls) <= {16, 48}, calls
    assert fc.kinds("pin_memory"), "the DataLoader pins the batches it hands to a GPU run"


def test_benchmarks_time_cuda_work_to_its_end(monkeypatch):
    """benchmarks/ghost_bn.py and benchmarks/overhead.py wait for the device around what they time."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import ghost_bn as ghost_bn_bench
    import gpu as gpu_bench
    import overhead as overhead_bench

    threads = torch.get_num_threads()
    try:
        with FakeCuda() as fc:
            ghost, plain = ghost_bn_bench.measure(threads, 64, 4, 4, repeats=2, warmup=1, device="cuda")
            overhead_bench._sync("cuda")
            gpu_bench.reset_peak(CUDA0)
            gpu_bench.sync(CUDA0)
            assert gpu_bench.peak_memory(CUDA0) == 0.0
    finally:
        torch.set_num_threads(threads)
    assert ghost > 0 and plain > 0
    # Before and after each timed fwd+bwd (2 layers x 2 repeats), overhead's _sync, gpu.py's sync(device).
    assert len(fc.cuda.named("synchronize")) == 2 * 2 * 2 + 1 + 1
    assert [c[1] for c in fc.cuda.named("reset_peak_memory_stats") + fc.cuda.named("max_memory_allocated")] == \
        [(CUDA0,), (CUDA0,)]
    assert "ghost_bn" in sys.modules


def test_the_tier_catches_a_cpu_tensor_in_a_cuda_op():
    """What makes "no device mismatch anywhere in the step" a checked claim: the fake raises where a GPU raises."""
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

    with FakeCuda():
        x = torch.ones(3, device="cuda")
        x + torch.ones(()) * 2  # a 0-dim CPU tensor is allowed (a scalar), as on a GPU
        with pytest.raises(FakeTensorDeviceMismatchError):
            x + torch.ones(3)


def test_nvjpeg_failure_is_a_data_error(monkeypatch, imagenet_shards):
    """A JPEG nvjpeg cannot decode: one line naming the fix (data.gpu_decode=false decodes in the workers)."""
    import torchvision.io

    from data_pipelines import ReaderOptions, build_data
    from harness.core.errors import DataError
    from harness.recipe.batch_plan import make_batch_plan

    def decode_jpeg(inputs, mode=None, device="cpu", **kw):
        raise RuntimeError("nvjpeg: bad Huffman table")  # what torchvision raises for a corrupt image

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    from dataclasses import replace

    options = replace(ReaderOptions.of(), workers=0, image_size=32, eval_resize=36, gpu_decode=True)
    with FakeCuda():
        reader = build_data("imagenet", imagenet_shards, True, 16, make_batch_plan(16, 1, 16), 0, 0, CUDA0,
                            torch.float32, options)
        with pytest.raises(DataError, match="GPU JPEG decoding failed .*set data.gpu_decode=false"):
            next(iter(reader.train_micro_batches(0)))


def test_ddp_binds_each_rank_to_its_gpu(monkeypatch):
    """At world size > 1 the engine wraps the model in DDP with device_ids=[the rank's GPU] (a double of DDP:
    no process group here)."""
    from harness.recipe.batch_plan import make_batch_plan
    from harness.train import engine

    made = []
    monkeypatch.setattr(engine, "DDP", lambda model, **kw: made.append(kw) or model)
    monkeypatch.setattr(engine.dist, "get_rank", lambda: 1)  # no process group either: this rank is rank 1
    with FakeCuda():
        model = torch.nn.Linear(4, 2, device="cuda")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        engine.DDPEngine(model, optimizer, make_batch_plan(8, 2, 4), torch.device("cuda", 1), "fp32", None)
    assert made == [{"device_ids": [1], "broadcast_buffers": False, "gradient_as_bucket_view": True}]


def test_sweep_worker_initializer_and_launcher_count_the_gpus(monkeypatch):
    """A local sweep worker's initializer reads torch.cuda.device_count() for its LOCAL_RANK; the launcher counts
    the node's GPUs the same way."""
    import signal

    from harness.sweep import local
    from launch.core import local_gpu_count

    class Queue(list):
        put = list.append

    counter, pids = multiprocessing.get_context("spawn").Value("i", 2), Queue()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)}
    monkeypatch.setenv("LOCAL_RANK", "x")
    try:
        with FakeCuda() as fc:
            fc.cuda.devices = 2
            # The parent-death watch would arm itself on pytest's own process (tests/test_faults_process.py tests it
            # in real workers); here only the device assignment is under test.
            monkeypatch.setattr(local, "die_with_parent", lambda parent: None)
            local._init_worker(0, pids, counter, os.getppid())
            assert local_gpu_count() == 2
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        local._WORKER_SIGNALS = None
    assert os.environ["LOCAL_RANK"] == "0" and pids == [os.getpid()]  # worker 2 of a pool on 2 GPUs: cuda:0


def test_a_gpu_node_packs_the_conv_nets_a_cpu_node_trains_one_by_one(tmp_path):
    """The sweep executor's pack decision reads torch.cuda.is_available() (harness/sweep/tasks.py cuda_here): on a
    GPU node a device-auto 2-D conv-net sweep trains in packs, on this CPU one by one (tests/test_pack_choice.py)."""
    from harness.sweep.spec import load_spec
    from harness.sweep.state import entry
    from harness.sweep.tasks import describe_packing, group_tasks
    from tests.conftest import write_config

    spec = write_config(tmp_path / "s.yaml", """
name: s
base:
  model: {name: wrn, depth: 10, width: 1}
  data: {name: cifar10, path: /nonexistent}
  batch: {global_batch_size: 64}
  budget: {steps: 3}
grid:
  optim.effective_lr: [0.05, 0.1, 0.2]
""")
    entries = [entry(r, []) for r in load_spec(spec, allow_unchecked_models=True).runs]
    assert [len(t) for t in group_tasks(entries, None, 8, 1)] == [1, 1, 1]  # CPU: one by one
    assert "wrn on cpu: one by one" in describe_packing(entries, None)
    with FakeCuda():
        assert [len(t) for t in group_tasks(entries, None, 8, 1)] == [3]  # one pack of the three rates
        assert "wrn on cuda: packs" in describe_packing(entries, None)
