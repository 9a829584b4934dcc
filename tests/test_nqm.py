"""The noisy quadratic model as data + model (data_pipelines/nqm.py, models/quadratic.py): its moments are the
ones the closed forms assume, and it trains through the real trainer."""

import json

import numpy as np
import pytest
import torch

from data_pipelines.nqm import b_simple, critical_lr, spectrum, synth_nqm, targets
from harness.core.errors import ConfigError
from tests.conftest import final_state, run_harness, write_config


def nqm_config(tmp_path, data, extra="", name="nqm.yaml", model="{name: quadratic, init: 1.0}"):
    return write_config(tmp_path / name, f"""
seed: 0
device: cpu
model: {model}
data: {{name: nqm, path: {data}}}
batch: {{global_batch_size: 16}}
optim: {{name: sgd, effective_lr: 0.25, weight_decay: 0.0}}
budget: {{steps: 40}}
speed: {{fused_optimizer: false}}
log: {{every_steps: 10, progress: false, tensorboard: false}}
{extra}
""")


def test_targets_have_exact_moments_and_gradient_covariance_sigma2_h(tmp_path):
    manifest = synth_nqm(tmp_path, train=4096, dim=8, lambda_max=2.0, power=1.0, sigma=3.0, seed=1)
    h = spectrum(8, 2.0, 1.0)
    x = targets(manifest)
    assert np.allclose(x.mean(0), 0, atol=1e-12) and np.allclose(x.var(0), 9.0 / h)
    # Per-example gradients H (w - x_i) through the model's own autograd: mean H w, covariance trace sigma^2 tr H.
    from models.quadratic import NoisyQuadratic

    torch.manual_seed(0)
    model = NoisyQuadratic(h.tolist(), 1.0).double()
    xs = torch.from_numpy(x)
    grads = torch.func.vmap(torch.func.grad(lambda w, xi: torch.func.functional_call(model, {"weight": w}, xi[None]).sum()),
                            in_dims=(None, 0))(model.weight.detach(), xs)
    w = model.weight.detach().numpy()
    assert np.allclose(grads.mean(0).numpy(), h * w)
    assert np.trace(np.cov(grads.numpy().T, bias=True)) == pytest.approx(9.0 * h.sum())
    # Every direction starts at loss init^2 / 2: the data's mean loss is exactly 1/2 w^T H w = d / 2.
    assert model(xs).mean().item() == pytest.approx(0.5 * np.sum(h * w * w)) == pytest.approx(4.0)
    assert b_simple(h, 3.0, w) == pytest.approx(9.0)  # sigma^2 / init^2 at initialisation
    assert critical_lr(1.5) == pytest.approx(4 / 3) and critical_lr(1.0, 0.9) == pytest.approx(38.0)


def test_nqm_trains_through_harness_train(tmp_path):
    data = tmp_path / "nqm"
    proc = run_harness("data", "synth", "nqm", data, "--dim", "16", "--train", "2048", "--sigma", "2")
    assert "wrote the noisy quadratic" in proc.stdout and (data / "manifest.json").is_file()
    run = tmp_path / "run"
    run_harness("train", nqm_config(tmp_path, data), "--run-dir", run)
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["test_metric"] == "test_loss"
    h = np.asarray(json.loads((data / "manifest.json").read_text())["nqm"]["curvature"])
    w = final_state(run)["weight"].double().numpy()
    assert result["test_loss"] == pytest.approx(0.5 * np.sum(h * w * w), rel=1e-5)  # exact: the population mean
    assert result["test_loss"] < 0.5 * 16 / 2  # it trained: from d init^2 / 2 = 8 to 2.3
    bad = run_harness("train", nqm_config(tmp_path, data, name="bad.yaml", model="{name: mlp}"), "--run-dir",
                      tmp_path / "bad", check=False)
    assert bad.returncode == 2 and "trains model.name: quadratic, not mlp" in bad.stderr


def test_quadratic_model_refuses_other_data():
    from models.quadratic import QuadraticConfig

    with pytest.raises(ConfigError, match="data.name: nqm"):
        QuadraticConfig().task("classification")
