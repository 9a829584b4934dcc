"""Every model of the paper: parameter counts, config keys, `harness plan` without shards, and a few steps of
`harness train` on synthetic data of its task in every norm variant."""

import json
import math
import re

import pytest
import torch

import models
from data_pipelines import KNOWN
from harness.core.errors import ConfigError
from harness.recipe.optim import param_groups
from harness.train.config import from_dict
from tests.conftest import final_state, max_abs_diff, run_harness, write_config


def build(spec_name, **model):
    cfg = from_dict({"model": model, "data": {"name": spec_name, "path": "/nonexistent"}, "budget": {"steps": 1}}).model
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return models.build_model(cfg, KNOWN[spec_name])


@pytest.mark.parametrize("spec, model, count", [
    ("cifar10", {"name": "wrn", "depth": 16, "width": 4}, 2_748_890),
    ("cifar100", {"name": "wrn", "depth": 28, "width": 10}, 36_536_884),
    ("imagenet", {"name": "resnet"}, 25_557_032),
    ("ptb", {"name": "lstm"}, 19_780_400),  # Zaremba medium: 2 x 650, vocabulary 10,000
    ("mnist", {"name": "autoencoder"}, 2_837_314),  # 784-1000-500-250-30-250-500-1000-784
    ("mnist1d", {"name": "convnet"}, 9_706),  # 160 + 3,072 + 3,072 conv, 3 x 64 ghost BN, 320 x 10 + 10
])
def test_parameter_counts(spec, model, count):
    assert models.count_parameters(build(spec, **model)) == count


def test_resnet50_is_torchvision_layout_with_ghost_bn():
    from torchvision.models import resnet50

    ours = build("imagenet", name="resnet")
    with torch.device("meta"):
        ref = resnet50()
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    assert {type(m).__name__ for m in ours.modules()} & {"BatchNorm2d"} == set()
    assert ours.layer1[0].bn1.ghost_batch_size == 64  # the paper's ghost batch size (secs. 3.2, 4)


def test_resnet_init_and_weight_decay_groups():
    torch.manual_seed(0)
    spec = KNOWN["cifar10"]
    cfg = from_dict({"model": {"name": "resnet", "depth": 50, "width": 8},
                     "data": {"name": "cifar10", "path": "/x"}, "budget": {"steps": 1}}).model
    assert cfg.no_bn_decay and cfg.ghost_batch_size == 64  # Goyal et al. sec. 5.1; the paper's groups
    model = models.build_model(cfg, spec)
    assert all((b.bn3.weight == 0).all() for layer in (model.layer1, model.layer4) for b in layer)  # zero-init residual
    assert (model.bn1.weight == 1).all() and model.fc.weight.std() < 0.02
    decay, no_decay = param_groups(model, cfg.exclude_norm_from_decay())
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay
    # Goyal et al. exempt exactly the BN gammas and betas; the classifier bias keeps its weight decay.
    assert {id(p) for p in no_decay["params"]} == {id(p) for n, p in model.named_parameters() if "bn" in n or "downsample.1" in n}
    assert any(p is model.fc.bias for p in decay["params"])
    assert len(param_groups(model, False)) == 1


def test_resnet_renamed_decay_key_is_a_one_line_error():
    with pytest.raises(ConfigError) as e:
        from_dict({"model": {"name": "resnet", "no_bn_bias_decay": True}, "data": {"name": "cifar10", "path": "/x"},
                   "budget": {"steps": 1}})
    assert "model.no_bn_bias_decay (did you mean 'no_bn_decay'?)" in str(e.value) and "\n" not in str(e.value)


def test_wrn_skipinit_is_regularized_skipinit():
    torch.manual_seed(0)
    cfg = from_dict({"model": {"name": "wrn", "depth": 10, "width": 1, "norm": "skipinit"},
                     "data": {"name": "cifar10", "path": "/x"}, "budget": {"steps": 1}}).model
    assert cfg.dropout == 0.6 and cfg.ghost_group_size() is None  # resolved into the run's config; no ghost groups
    model = models.build_model(cfg, KNOWN["cifar10"])
    assert not any("GhostBatchNorm" in type(m).__name__ for m in model.modules())
    assert all(b.alpha.item() == 0.0 and b.conv1.bias is not None for b in model.blocks)
    assert type(model.dropout).__name__ == "KeyedDropout" and model.dropout.p == 0.6
    # alpha = 0: every residual block is the identity (or its skip projection) at initialisation.
    model.eval()
    x = torch.randn(2, 16, 8, 8)
    block = model.blocks[0]
    assert torch.equal(block(x), x if block.shortcut is None else block.shortcut(torch.relu(x)))


@pytest.mark.parametrize("model, message", [
    ({"name": "wrn", "dropout": 0.3}, "dropout belongs to Regularized SkipInit"),
    ({"name": "wrn", "norm": "skipinit", "dropout": 1.0}, "model.dropout: a probability in [0, 1)"),
    ({"name": "wrn", "norm": "layernorm"}, "model.norm: 'layernorm' is not one of: ghost_bn, skipinit"),
    ({"name": "resnet", "depth": 20}, "model.depth: one of 18, 34, 50, 101, 152"),
    ({"name": "lstm", "dropout": -0.1}, "model.dropout: a probability in [0, 1)"),
    ({"name": "lstm", "unrol": 35}, "unknown config key model.unrol (did you mean 'unroll'?)"),
    ({"name": "autoencoder", "widths": []}, "model.widths: give one or more positive layer widths"),
    ({"name": "convnet", "kernels": [5, 3]}, "model.kernels: one kernel size per layer of model.channels (3), got 2"),
    ({"name": "convnet", "kernels": [4, 3, 3]}, "model.kernels: odd positive sizes"),
    ({"name": "convnet", "channels": []}, "model.channels: give one or more positive channel counts"),
    ({"name": "convnet", "chanels": [8]}, "unknown config key model.chanels (did you mean 'channels'?)"),
    ({"name": "convnet", "ghost_batch_size": 0}, "model.ghost_batch_size"),
])
def test_model_keys_are_validated(model, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict({"model": model, "data": {"name": "cifar10", "path": "/x"}, "budget": {"steps": 1}})


def test_model_and_data_must_match():
    cfg = from_dict({"model": {"name": "lstm"}, "data": {"name": "cifar10", "path": "/x"}, "budget": {"steps": 1}})
    with pytest.raises(ConfigError, match="lstm needs token-stream data"):
        models.build_model(cfg.model, KNOWN["cifar10"])
    with pytest.raises(ConfigError, match="wrn needs labelled images"):
        models.build_model(from_dict({"data": {"name": "ptb", "path": "/x"}, "budget": {"steps": 1}}).model, KNOWN["ptb"])
    with pytest.raises(ConfigError, match=r"convnet needs labelled 1-D signals, \(C, 1, L\) \(mnist1d\); data 'cifar10'"):
        models.build_model(from_dict({"model": {"name": "convnet"}, "data": {"name": "cifar10", "path": "/x"},
                                      "budget": {"steps": 1}}).model, KNOWN["cifar10"])


def convnet(**keys):
    cfg = from_dict({"model": {"name": "convnet", **keys}, "data": {"name": "mnist1d", "path": "/x"},
                     "budget": {"steps": 1}}).model
    return models.build_model(cfg, KNOWN["mnist1d"])


def test_convnet_shapes_and_ghost_groups():
    """Signals (N, 1, 1, 40) -> logits (N, 10); every norm is a ghost BN over groups of ghost_batch_size examples:
    in training, an example's output depends on its own group only."""
    from models.ghost_bn import ghost_bn_layers, update_running_stats

    torch.manual_seed(0)
    model = convnet(ghost_batch_size=16, channels=[8, 8, 8])
    layers = ghost_bn_layers(model)
    assert [(l.num_features, l.ghost_batch_size) for l in layers] == [(8, 16)] * 3
    assert not any(getattr(m, "inplace", False) for m in model.modules())  # no in-place ops (vmap packing)
    x = torch.randn(48, 1, 1, 40)
    y = model(x)
    assert y.shape == (48, 10)
    x2 = x.clone()
    x2[16:32] = 3 * torch.randn(16, 1, 1, 40) + 1  # change group 2 only
    y2 = model(x2)
    assert torch.equal(y2[:16], y[:16]) and torch.equal(y2[32:], y[32:]) and not torch.allclose(y2[16:32], y[16:32])
    # Group 1 alone gives what it gave inside the batch (fp32 round-off): its statistics are its own.
    assert torch.allclose(model(x[:16]), y[:16], atol=1e-5)
    assert [int(l.stat_accumulator[-1]) for l in layers] == [3 + 3 + 1] * 3  # groups seen since the last update
    update_running_stats(model)
    assert all(l.stat_accumulator.abs().sum() == 0 and not torch.equal(l.running_mean, torch.zeros(8)) for l in layers)
    with pytest.raises(RuntimeError, match="not a multiple of ghost_batch_size=16"):
        model(x[:40])
    model.eval()  # evaluation: running statistics, any batch size
    assert model(x[:5]).shape == (5, 10)


def test_convnet_runs_batch_under_vmap():
    """Three models stacked and run by torch.func.vmap in training mode equal each model run alone: the model is
    plain modules and GhostBatchNorm, as packed runs (harness/train/packed.py) need."""
    from torch.func import functional_call, stack_module_state, vmap

    torch.manual_seed(0)
    nets = [convnet(ghost_batch_size=16) for _ in range(3)]
    params, buffers = stack_module_state(nets)
    x = torch.randn(3, 32, 1, 1, 40)
    packed = vmap(lambda p, b, xi: functional_call(nets[0], (p, b), (xi,)))(params, buffers, x)
    alone = torch.stack([net(x[i]) for i, net in enumerate(nets)])
    assert torch.allclose(packed, alone, atol=1e-5)


@pytest.mark.parametrize("model, data, batch, budget, params, steps", [
    ("{name: resnet}", "imagenet", 256, "{epochs: 90}", 25_557_032, 450_410),
    ("{name: lstm}", "ptb", 64, "{epochs: 40}", 19_780_400, 16_560),  # table 6: 16560 steps = 40 epochs at B = 64
    ("{name: autoencoder}", "mnist", 64, "{steps: 156250}", 2_837_314, 156_250),
    ("{name: wrn, depth: 28, width: 10, norm: skipinit}", "cifar100", 64, "{steps: 156250}", 36_529_040, 156_250),
])
def test_plan_prints_parameters_from_standard_sizes(tmp_path, capsys, model, data, batch, budget, params, steps):
    from harness.cli import main

    cfg = write_config(tmp_path / "c.yaml", f"model: {model}\ndata: {{name: {data}, path: {tmp_path / 'absent'}}}\n"
                                            f"batch: {{global_batch_size: {batch}}}\nbudget: {budget}\n")
    with pytest.raises(SystemExit) as done:  # in-process: the subprocess path is tests/test_plan.py's
        main(["plan", str(cfg), "--json"])
    assert done.value.code == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["parameters"], info["steps"]) == (params, steps)
    assert "standard" in info["data_source"]


# ---- a few steps of `harness train` per model, on synthetic data of its task ----

@pytest.fixture(scope="module")
def mnist_shards(tmp_path_factory):
    from data_pipelines.synth import synth

    dest = tmp_path_factory.mktemp("mnist")
    synth("mnist", dest, train=256, test=128, seed=0)
    return dest


@pytest.fixture(scope="module")
def ptb_shards(tmp_path_factory):
    from data_pipelines.synth import synth

    dest = tmp_path_factory.mktemp("ptb")
    synth("ptb", dest, train=2000, test=300, seed=0)
    return dest


def train(tmp_path, name, text, *overrides):
    run = tmp_path / name
    run_harness("train", write_config(tmp_path / f"{name}.yaml", text), "--run-dir", run, *overrides)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run, json.loads((run / "result.json").read_text()), [r for r in records if "train_loss" in r]


LOG = "log: {every_steps: 1, progress: false, tensorboard: false}"


def test_wrn_skipinit_trains_with_dropout_keyed_per_example(tmp_path, cifar_shards):
    """Regularized SkipInit (dropout 0.6) gives the same trajectory as one micro-batch or four accumulated."""
    text = f"""seed: 5
precision: fp64
model: {{name: wrn, depth: 10, width: 1, norm: skipinit}}
data: {{name: cifar10, path: {cifar_shards}}}
batch: {{global_batch_size: 64}}
optim: {{name: momentum, effective_lr: 0.5}}
budget: {{steps: 2}}
{LOG}
"""
    run1, result, records = train(tmp_path, "m64", text, "--set", "batch.micro_batch_size=64")
    run4, result4, _ = train(tmp_path, "m16", text, "--set", "batch.micro_batch_size=16")
    assert result["status"] == "completed" and result4["layout"]["accumulation_steps"] == 4
    assert result["layout"]["ghost_batch_size"] is None  # no normalization: any micro-batch size
    assert records[-1]["update_norm"] > 1e-6  # the branches start at alpha = 0: small but real updates
    assert max_abs_diff(final_state(run4), final_state(run1)) < 1e-10
    assert result4["test_accuracy"] == result["test_accuracy"]


def test_resnet_tiny_trains(tmp_path, cifar_shards):
    run, result, records = train(tmp_path, "resnet", f"""
model: {{name: resnet, depth: 18, width: 8, no_bn_decay: true}}
data: {{name: cifar10, path: {cifar_shards}}}
batch: {{global_batch_size: 64}}
optim: {{name: momentum, effective_lr: 0.5}}
budget: {{steps: 3}}
{LOG}
""")
    assert result["status"] == "completed" and result["layout"]["ghost_batch_size"] == 64
    assert result["test_metric"] == "test_accuracy" and 0 <= result["test_accuracy"] <= 100
    assert result["parameters"] == 177_362 and records[-1]["update_norm"] > 1e-6


def test_autoencoder_trains_and_reports_summed_squared_error(tmp_path, mnist_shards):
    run, result, records = train(tmp_path, "ae", f"""
model: {{name: autoencoder, widths: [64, 16]}}
data: {{name: mnist, path: {mnist_shards}}}
batch: {{global_batch_size: 32}}
optim: {{name: momentum, effective_lr: 0.05, weight_decay: 1.0e-5}}
budget: {{steps: 8}}
{LOG}
""")
    assert (result["test_metric"], result["higher_is_better"]) == ("test_mse", False)
    assert records[-1]["train_loss"] < records[0]["train_loss"]  # it learns
    # Summed over 784 pixels in [0, 1], averaged over images: far above 1 this early, below 784.
    assert 5.0 < result["test_mse"] < 784.0 and result["test_mse"] == result["test_loss"]
    assert result["train_loss"] == pytest.approx(sum(r["train_mse"] for r in records[-1:]))


def test_lstm_trains_and_reports_perplexity(tmp_path, ptb_shards):
    run, result, records = train(tmp_path, "lstm", f"""
model: {{name: lstm, layers: 2, hidden: 16, unroll: 5}}
data: {{name: ptb, path: {ptb_shards}}}
batch: {{global_batch_size: 8}}
optim: {{name: momentum, effective_lr: 1.0, weight_decay: 0.0, grad_clip_norm: 5.0}}
budget: {{epochs: 0.2}}
{LOG}
""")
    assert result["steps"] == 9  # floor(0.2 x 49): 2000 tokens / 8 streams = 250; (250 - 1) // 5 = 49 steps per epoch
    assert (result["test_metric"], result["higher_is_better"]) == ("test_perplexity", False)
    assert result["test_perplexity"] == pytest.approx(math.exp(result["test_loss"]))
    assert result["train_perplexity"] == pytest.approx(math.exp(result["train_loss"]))
    assert all(r["train_perplexity"] == pytest.approx(math.exp(r["train_loss"])) for r in records)
    assert 50 < result["test_perplexity"] < 400  # a 200-word vocabulary: about 200 before learning
