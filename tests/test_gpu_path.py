"""The GPU path's promises that a CPU can check: the steady state of a step reads nothing back from the device, the
math mode is set and recorded, a checkpoint's RNG state restores whatever device it was loaded to, and the
engines' options (fused SGD, channels_last, compile) train the same run."""

import json

import pytest
import torch

from harness.train import numerics
from harness.train.checkpoint import Checkpointer, rng_state, set_rng_state
from harness.train.config import load_config
from harness.train.trainer import train

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def config(shards, steps, *extra):
    return load_config(None, ["data.name=cifar10", f"data.path={shards}", "model.name=wrn", "model.depth=10",
                              "model.width=1", "batch.global_batch_size=128", "batch.max_micro_batch_size=64",
                              f"budget.steps={steps}", f"log.every_steps={steps}", "log.progress=false",
                              "log.tensorboard=false", "checkpoint.every_minutes=null", "device=cpu", *extra])


def count_reads(monkeypatch, run) -> int:
    """How often a tensor's value is read on the host (the calls that would wait for a GPU) while `run()` runs."""
    calls = {"n": 0}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            calls["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    run()
    monkeypatch.undo()
    return calls["n"]


@pytest.mark.parametrize("extra", [[], ["log.noise_scale=true"]])
def test_steady_state_steps_read_nothing_back_from_the_device(monkeypatch, tmp_path, cifar_shards, extra):
    """A run of 8 steps and one of 4 (both logging once, at the end) read device values back equally often:
    the steps in between cost no host read (ghost-BN update, objectives, engine, ledger, noise scale)."""
    short = count_reads(monkeypatch, lambda: train(config(cifar_shards, 4, *extra), tmp_path / "short"))
    long = count_reads(monkeypatch, lambda: train(config(cifar_shards, 8, *extra), tmp_path / "long"))
    assert long == short, (short, long)
    result = json.loads((tmp_path / "long" / "result.json").read_text())
    assert result["status"] == "completed" and result["steps"] == 8
    if extra:
        assert result["b_simple"] > 0


def test_divergence_is_recorded_at_its_step_though_noticed_at_a_log_step(tmp_path, cifar_shards):
    """The ledger keeps the first diverged step: `diverged_at_step` is exact even when the check is read later."""
    # The loss starts near ln 10 = 2.3: above max_loss at step 1, read back only at step 6.
    cfg = config(cifar_shards, 12, "divergence.max_loss=1.0", "log.every_steps=6")
    result = train(cfg, tmp_path / "div")
    assert result["status"] == "diverged" and result["diverged_at_step"] == 1
    assert result["steps"] == result["diverged_at_step"]
    lines = (tmp_path / "div" / "metrics.jsonl").read_text().splitlines() if (tmp_path / "div" / "metrics.jsonl").exists() else []
    assert not [line for line in lines if "train_loss" in line]  # nothing logged at or after the divergence


def test_math_mode_is_set_and_recorded(tmp_path, digits_shards):
    try:
        assert numerics.configure("fp32", False, torch.device("cpu"))["fp32_math"] == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee" == torch.backends.cudnn.rnn.fp32_precision
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        mode = numerics.configure("tf32", True, torch.device("cpu"))
        assert mode["fp32_math"] == "tf32" and torch.backends.cudnn.conv.fp32_precision == "tf32"
        assert torch.are_deterministic_algorithms_enabled() and mode["resume_promise"].startswith("bitwise")
    finally:
        numerics.configure("fp32", False, torch.device("cpu"))
    cfg = load_config(None, ["data.name=digits", f"data.path={digits_shards}", "model.name=mlp", "budget.steps=2",
                             "log.progress=false", "device=cpu", "speed.deterministic=true"])
    try:
        train(cfg, tmp_path / "run")
    finally:
        numerics.configure("fp32", False, torch.device("cpu"))
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["numerics"]["deterministic"] is True and env["numerics"]["fp32_math"] == "ieee"


def test_rng_state_restores_whatever_device_or_dtype_it_was_loaded_as(tmp_path):
    """torch.load(map_location=cuda) used to turn the saved CPU RNG state into a CUDA tensor, which
    torch.set_rng_state refuses: every resume on a GPU crashed. Checkpoints now load on the CPU, and the setter
    takes the state as whatever tensor it became."""
    torch.manual_seed(3)
    saved = rng_state()
    expected = torch.rand(5)
    moved = {k: v.to(torch.int64) for k, v in saved.items()}  # a tensor that is no longer a CPU ByteTensor
    set_rng_state(moved)
    assert torch.equal(torch.rand(5), expected)
    ck = Checkpointer(tmp_path, keep=2, is_main=True)
    ck.save(1, {"rng": saved, "w": torch.ones(2)})
    payload, _ = ck.load_latest()
    assert payload["rng"]["cpu"].device.type == "cpu" and payload["rng"]["cpu"].dtype == torch.uint8
    set_rng_state(payload["rng"])
    assert torch.equal(torch.rand(5), expected)


@pytest.fixture(scope="module")
def default_speed_run(tmp_path_factory, cifar_shards):
    """The run with the default speed options, which each option's run is compared with (trained once)."""
    run = tmp_path_factory.mktemp("speed") / "base"
    return run, train(config(cifar_shards, 4, "precision=fp64"), run)


@pytest.mark.slow
@pytest.mark.parametrize("speed", [["speed.fused_optimizer=false"], ["speed.channels_last=true"], ["speed.compile=true"]])
def test_speed_options_train_the_same_run(tmp_path, cifar_shards, speed, default_speed_run):
    """Foreach instead of fused SGD, channels_last and torch.compile change kernels, not the run: fp64 results
    agree with the default to round-off."""
    base_run, base = default_speed_run
    other = train(config(cifar_shards, 4, "precision=fp64", *speed), tmp_path / "other")
    assert abs(other["train_loss"] - base["train_loss"]) < 1e-10
    assert abs(other["test_accuracy"] - base["test_accuracy"]) < 1e-9
    a = torch.load(base_run / "checkpoints" / "final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "other" / "checkpoints" / "final.pt", weights_only=True)["model"]
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()) < 1e-10
