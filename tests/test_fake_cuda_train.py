"""The fake-CUDA tier, training: the real trainer (harness.train.trainer.train) with device: cuda on fake cuda:0
tensors (tests/fake_cuda.py), every model family and reader, fp32, bf16 autocast and channels_last.

What runs: config, plan, reader (batch placement on the device, augmentation), model build and .to(cuda),
channels_last, ghost BN (forward and its own backward), the objective, the engine (autocast, gradient
accumulation, the noise-scale estimator, clipping, fused or foreach SGD), the schedule, the ledger, read-back,
evaluation, checkpoint and the final record. What does not: torch's own backward kernels (the autograd engine
cannot run on fake CUDA tensors; tests/fake_cuda.py explains the graph walk that stands in for it), and every
value (fake tensors have none: losses and metrics are dummies)."""

from __future__ import annotations

import pytest
import torch

from harness.train import checkpoint as checkpoint_module
from harness.train import record as record_module
from harness.train import trainer
from harness.train.config import load_config
from tests.fake_cuda import FakeCuda

pytestmark = pytest.mark.fake_cuda

STEPS = 5  # log at 2 and 4 (and 5, the end), evaluate at 3, checkpoint at 4: each phase once or twice


@pytest.fixture(scope="module")
def ptb_shards(tmp_path_factory):
    from data_pipelines.synth import synth

    dest = tmp_path_factory.mktemp("ptb")
    synth("ptb", dest, train=4000, test=60, seed=0)  # the eval stream is one sequence: keep it short
    return dest


@pytest.fixture(scope="module")
def nqm_data(tmp_path_factory):
    from data_pipelines.nqm import synth_nqm

    dest = tmp_path_factory.mktemp("nqm")
    synth_nqm(dest, train=1024, dim=16)
    return dest


# family -> (data fixture, data name, overrides): each small, each the family's real code path.
FAMILIES = {
    "wrn-ghost-bn": ("cifar_shards", "cifar10", ["model.name=wrn", "model.depth=10", "model.width=1",
                                                 "batch.global_batch_size=64", "model.ghost_batch_size=16"]),
    "wrn-skipinit-dropout": ("cifar_shards", "cifar10", ["model.name=wrn", "model.depth=10", "model.width=1",
                                                         "model.norm=skipinit", "model.dropout=0.3",
                                                         "batch.global_batch_size=32"]),
    "resnet50-stream": ("imagenet_shards", "imagenet", ["model.name=resnet", "model.depth=50", "model.width=8",
                                                        "model.ghost_batch_size=8", "data.image_size=32",
                                                        "data.eval_resize=36", "data.workers=0",
                                                        "batch.global_batch_size=16", "data.eval_batch_size=48"]),
    "lstm": ("ptb_shards", "ptb", ["model.name=lstm", "model.layers=2", "model.hidden=16", "model.unroll=5",
                                   "model.dropout=0.5", "batch.global_batch_size=8", "optim.grad_clip_norm=5.0"]),
    "autoencoder": ("digits_shards", "digits", ["model.name=autoencoder", "model.widths=[16,4]",
                                                "batch.global_batch_size=32"]),
    "mlp": ("digits_shards", "digits", ["model.name=mlp", "batch.global_batch_size=32"]),
    "convnet": ("mnist1d_shards", "mnist1d", ["model.name=convnet", "model.channels=[4,4,4]",
                                              "model.ghost_batch_size=16", "batch.global_batch_size=32"]),
    "quadratic": ("nqm_data", "nqm", ["model.name=quadratic", "batch.global_batch_size=16",
                                      "speed.fused_optimizer=false", "optim.name=sgd", "optim.weight_decay=0.0"]),
}


def fake_config(shards, name, *extra):
    return load_config(None, [f"data.name={name}", f"data.path={shards}", "device=cuda", f"budget.steps={STEPS}",
                              "log.every_steps=2", "log.progress=false", "log.tensorboard=false",
                              "eval.every_steps=3", "checkpoint.every_minutes=null", "checkpoint.every_steps=4",
                              *extra])


class Saved:
    """atomic_save_torch's double: fake tensors have no bytes to write; keep (path, {key: (device, dtype)})."""

    def __init__(self):
        self.files = []

    def __call__(self, path, payload):
        tensors = {}

        def walk(prefix, o):
            if isinstance(o, torch.Tensor):
                tensors[prefix] = (o.device.type, o.dtype, type(o).__name__)
            elif isinstance(o, dict):
                for k, v in o.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            elif isinstance(o, (list, tuple)):
                for i, v in enumerate(o):
                    walk(f"{prefix}[{i}]", v)

        walk("", payload)
        self.files.append((path.name, tensors))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")  # not a checkpoint a later run could load: nothing resumes from it here


def fake_train(monkeypatch, cfg, run_dir):
    """trainer.train(cfg, run_dir) under FakeCuda, each part of the loop in its phase: (fc, result, saved)."""
    fc, saved = FakeCuda(), Saved()

    def step_phase(engine, objective, batches, plan, lr, want_norms):  # trainer.train_step's arguments
        return "step[log]" if want_norms else "step"

    for name, phase in (("train_step", step_phase), ("read_back", "read_back"), ("evaluate", "eval"),
                        ("save_checkpoint", "checkpoint"), ("finish", "finish")):
        monkeypatch.setattr(trainer, name, fc.phased(phase, getattr(trainer, name)))
    monkeypatch.setattr(trainer, "loop", fc.phased("loop", trainer.loop))
    monkeypatch.setattr(record_module, "atomic_save_torch", saved)
    monkeypatch.setattr(checkpoint_module, "atomic_save_torch", saved)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # speed.deterministic sets it: undone after
    try:
        with fc:
            result = trainer.train(cfg, run_dir)
    finally:
        restore_math_mode()
    return fc, result, saved


def restore_math_mode() -> None:
    """A run on cuda turns cuDNN autotuning on (and speed.deterministic the deterministic algorithms): the
    process-wide defaults of the CPU tests, back."""
    from harness.train import numerics

    numerics.configure("fp32", False, torch.device("cpu"))


def assert_gpu_path(fc, result, cfg):
    """What every fake-CUDA run must show: completed, no host sync in a step, one copy per read-back, the
    device and RNG placement of the checkpoint, the torch.cuda calls a GPU run makes."""
    assert result["status"] == "completed" and result["steps"] == STEPS, result
    allowed = ("setup", "read_back", "eval", "checkpoint", "finish")  # the steps themselves never wait
    assert all(r.phase in allowed for r in fc.syncs()), fc.describe(r for r in fc.syncs() if r.phase not in allowed)
    read_backs = fc.syncs("read_back")
    # Read back at steps 2 and 4 (log), 3 (before the evaluation), 5 (the end): one copy each, nothing else.
    assert [r.kind for r in read_backs] == ["sync cuda->cpu copy"] * 4, fc.describe(read_backs)
    assert not fc.kinds("non_blocking copy from unpinned memory"), fc.describe(fc.kinds("non_blocking"))
    names = {c[0] for c in fc.cuda.calls}
    assert {"set_device", "current_device", "get_device_name", "get_rng_state"} <= names, names


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_trains_on_fake_cuda(family, precision, monkeypatch, tmp_path, request):
    fixture, name, extra = FAMILIES[family]
    cfg = fake_config(request.getfixturevalue(fixture), name, f"precision={precision}", *extra)
    # The LSTM without cuDNN: torch's cuDNN RNN queries the (absent) driver even for fake tensors; the native LSTM
    # that runs instead is the same model in matrix products. Not exercised here: the cuDNN RNN kernel.
    if family == "lstm":
        monkeypatch.setattr(torch.backends.cudnn, "enabled", False)
    fc, result, saved = fake_train(monkeypatch, cfg, tmp_path / "run")
    assert_gpu_path(fc, result, cfg)
    # bf16: every matrix product and convolution of the forward under autocast runs in bf16; fp32: in fp32.
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    dtypes = {dtype for (_, dtype) in fc.ops}
    if family != "quadratic":  # the quadratic has no matrix product (elementwise: 1/2 sum h (w - c)^2)
        assert dtypes == {want}, fc.ops
    # channels_last is the CUDA default for models with 2-D convolutions: every weight is in it, and in fp32 so is
    # every activation; only the images from the reader arrive NCHW (cuDNN converts them in the first
    # convolution). In bf16 the output layout of a fake convolution follows torch's backend choice, which needs
    # the device (no cuDNN without a driver): there only the weights are checked.
    assert (family in ("wrn-ghost-bn", "wrn-skipinit-dropout", "resnet50-stream")) == bool(fc.convs)
    assert all(weight_cl and (input_cl or channels == 3 or precision == "bf16")
               for channels, input_cl, weight_cl in fc.convs), fc.convs
    if family in ("wrn-ghost-bn", "convnet"):
        assert fc.custom_backward["_LocalGroups"] > 0
    step_ckpt = [t for n, t in saved.files if n.startswith("step-")]
    assert step_ckpt, saved.files
    rng = {k: v for k, v in step_ckpt[0].items() if k.startswith("rng")}
    assert rng == {"rng.cpu": ("cpu", torch.uint8, "Tensor"), "rng.cuda": ("cpu", torch.uint8, "Tensor")}, rng
    assert all(dev == "cuda" for k, (dev, _, _) in step_ckpt[0].items() if k.startswith("model.")), step_ckpt[0]


def test_language_model_dropout_keys_are_the_host_keys_made_on_the_device(ptb_shards):
    """The LSTM reader used to build each step's dropout keys in numpy and copy them to the device: a blocking
    host-to-device copy every step (the family test above found it). The device keys are the host ones bit for bit."""
    import numpy as np

    from data_pipelines import build_data
    from data_pipelines.order import example_keys
    from harness.recipe.batch_plan import make_batch_plan

    reader = build_data("ptb", ptb_shards, False, 16, make_batch_plan(8, 1, 4), 3, 0, torch.device("cpu"),
                        torch.float32, unroll=5)
    for step in (0, 7):
        for a, batch in enumerate(reader.train_micro_batches(step)):
            lo, hi = batch.streams
            host = example_keys(3, np.full(hi - lo, step, dtype=np.int64), np.arange(lo, hi, dtype=np.int64))
            assert batch.keys.tolist() == host.view(np.int64).tolist()


@pytest.mark.parametrize("extra", [
    ["precision=bf16", "log.noise_scale=true", "optim.grad_clip_norm=5.0"],  # noise scale: B split in two micro-steps
    ["precision=fp32", "batch.max_micro_batch_size=16", "schedule.warmup_steps=3"],  # accumulation over 4, warm-up
    ["precision=fp32", "speed.fused_optimizer=false", "speed.channels_last=false"],  # foreach SGD, NCHW
    ["precision=tf32", "speed.deterministic=true"],
    ["precision=fp64", "eval.train_loss=true"],
], ids=["bf16-noise-clip", "accumulation-warmup", "foreach-nchw", "tf32-deterministic", "fp64-train-loss"])
def test_the_steady_state_step_on_fake_cuda(extra, monkeypatch, tmp_path, cifar_shards):
    """The trainer's step with each of its options: still no host sync in a step, one copy per read-back, fused
    SGD on one device with matching shapes (or foreach), channels_last off when asked."""
    cfg = fake_config(cifar_shards, "cifar10", *FAMILIES["wrn-ghost-bn"][2], *extra)
    fc, result, _ = fake_train(monkeypatch, cfg, tmp_path / "run")
    assert_gpu_path(fc, result, cfg)
    fused = fc.kinds("fused_sgd", "step", "step[log]")
    assert len(fused) == (0 if cfg.speed.fused_optimizer is False else STEPS), fc.describe(fused)
    if cfg.speed.channels_last is False:
        assert fc.convs and not any(input_cl for _, input_cl, _ in fc.convs)  # (a 1x1 weight is both layouts)
    if cfg.log.noise_scale:
        assert "b_simple" in result
    if cfg.precision == "fp64":
        assert {dtype for _, dtype in fc.ops} == {torch.float64}
