"""The online gradient noise scale B_simple = tr(Sigma) / |G|^2 (harness/train/noise_scale.py): the estimator on
synthetic gradients, then real runs on the noisy quadratic against its closed form sigma^2 tr(H) / |H w|^2, at
world size 1 (accumulation, and the automatic split into two micro-steps) and under torchrun at W = 2 (gloo)."""

import json

import numpy as np
import pytest
import torch

from data_pipelines.nqm import b_simple, synth_nqm
from harness.train.noise_scale import NoiseScale
from tests.conftest import final_state, torchrun, write_config

SIGMA, INIT = 4.0, 1.0  # B_simple at initialisation: sigma^2 / init^2 = 16


def test_estimator_is_exact_on_expected_norms_and_unbiased_on_sampled_gradients():
    # E|G_b|^2 = |G|^2 + tr(Sigma) / b: fed those expectations, both estimates are exact at every step.
    est = NoiseScale(8, 64, 0.9, torch.device("cpu"))
    for _ in range(3):
        est.observe(torch.tensor(2.0 + 40.0 / 8), torch.tensor(2.0 + 40.0 / 64))
    v = est.values()
    assert v["noise_trace"].item() == pytest.approx(40.0) and v["noise_grad_sq"].item() == pytest.approx(2.0)
    assert v["b_simple"].item() == pytest.approx(20.0)
    # Sampled: per-example gradients G + noise of covariance diag(s); the first b of each batch of B.
    gen = torch.Generator().manual_seed(0)
    d, b, big = 50, 16, 64
    g_true = torch.full((d,), 0.3, dtype=torch.float64)
    scale = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    est = NoiseScale(b, big, 0.995, torch.device("cpu"))
    for _ in range(4000):
        per_example = g_true + scale * torch.randn(big, d, generator=gen, dtype=torch.float64)
        est.observe(per_example[:b].mean(0).square().sum(), per_example.mean(0).square().sum())
    expected = scale.square().sum().item() / g_true.square().sum().item()  # tr(Sigma) / |G|^2 = 29.2
    assert est.values()["b_simple"].item() == pytest.approx(expected, rel=0.15)


def test_state_resumes_only_at_the_same_two_batch_sizes():
    a = NoiseScale(8, 64, 0.9, torch.device("cpu"))
    a.observe(torch.tensor(7.0), torch.tensor(2.625))
    b = NoiseScale(8, 64, 0.9, torch.device("cpu"))
    b.load_state_dict(a.state_dict())
    assert b.values()["b_simple"].item() == pytest.approx(a.values()["b_simple"].item()) and b.steps == 1
    c = NoiseScale(16, 64, 0.9, torch.device("cpu"))  # another layout: the smoothing restarts
    c.load_state_dict(a.state_dict())
    assert c.steps == 0 and c.trace.item() == 0.0


@pytest.fixture(scope="module")
def nqm_data(tmp_path_factory):
    dest = tmp_path_factory.mktemp("nqm")
    synth_nqm(dest, train=16384, dim=32, lambda_max=1.5, power=1.0, sigma=SIGMA)
    return dest


def nqm_run_config(tmp_path, data, batch: str, steps=300, lr=1e-3):
    return write_config(tmp_path / "nqm.yaml", f"""
seed: 0
device: cpu
model: {{name: quadratic, init: {INIT}}}
data: {{name: nqm, path: {data}}}
batch: {batch}
optim: {{name: sgd, effective_lr: {lr}, weight_decay: 0.0}}
budget: {{steps: {steps}}}
speed: {{fused_optimizer: false}}
log: {{every_steps: 50, progress: false, noise_scale: true}}
""")


def check_against_closed_form(run, data) -> dict:
    """b_simple in result.json, metrics.jsonl and TensorBoard; within a factor 2 of the closed form at the final
    weights (the rate is small, so w, and B_simple, hardly move during the EMA's memory of ~100 steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = json.loads((run / "result.json").read_text())
    h = np.asarray(json.loads((data / "manifest.json").read_text())["nqm"]["curvature"])
    exact = b_simple(h, SIGMA, final_state(run)["weight"].double().numpy())
    print(f"b_simple online {result['b_simple']:.2f}, closed form {exact:.2f}, layout {result['layout']}")
    assert 0.5 < result["b_simple"] / exact < 2.0, (result["b_simple"], exact)
    assert result["noise_trace"] == pytest.approx(SIGMA ** 2 * h.sum(), rel=0.2)  # tr(Sigma) does not depend on w
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["b_simple"] for r in records if "b_simple" in r]
    assert len(logged) == 6 and logged[-1] == pytest.approx(result["b_simple"])
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert len(acc.Scalars("train/b_simple")) == 6
    return {"online": result["b_simple"], "exact": exact, "layout": result["layout"]}


@pytest.mark.parametrize("batch, small", [("{global_batch_size: 64, micro_batch_size: 16}", 16),  # 4 micro-steps
                                          ("{global_batch_size: 64}", 32)])  # split in two by the trainer
def test_online_b_simple_on_the_noisy_quadratic_world_size_1(tmp_path, nqm_data, batch, small):
    from harness.train.config import load_config
    from harness.train.trainer import train

    run = tmp_path / "run"
    train(load_config(nqm_run_config(tmp_path, nqm_data, batch)), run)
    got = check_against_closed_form(run, nqm_data)
    assert got["layout"]["micro_batch_size"] == small and got["layout"]["world_size"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("batch", ["{global_batch_size: 64}",  # A = 1: each rank's gradient in the DDP comm hook
                                   "{global_batch_size: 64, micro_batch_size: 16}"])  # A = 2: first micro-steps
def test_online_b_simple_under_torchrun_world_size_2(tmp_path, nqm_data, batch):
    run = tmp_path / "run"
    torchrun(2, "train", nqm_run_config(tmp_path, nqm_data, batch), "--run-dir", run)
    got = check_against_closed_form(run, nqm_data)
    assert got["layout"]["world_size"] == 2
