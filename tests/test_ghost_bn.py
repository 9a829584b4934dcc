"""Ghost batch norm: local groups independent of the micro-batch and equal to per-group batch norm; groups across
ranks equal one batch norm over the same 64 examples (through the real torchrun, gloo); keyed dropout follows the
example."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from models.dropout import KeyedDropout, dropout_keys, keep_mask
from models.ghost_bn import GhostBatchNorm2d, update_running_stats
from tests.conftest import ROOT, harness_env


def test_local_groups_are_independent_of_the_micro_batch():
    """Any micro-batch of whole groups normalizes each group alike (fp64: to round-off), and the running
    statistics after the step are the same."""
    torch.manual_seed(0)
    x = (torch.randn(256, 8, 6, 6) * 2 + 1).double()
    g = torch.randn_like(x)
    outs, grads, running = [], [], []
    for micro in (64, 128, 256):  # 4 micro-batches of one group ... one of four groups
        layer = GhostBatchNorm2d(8, 64).double()
        xs = x.clone().requires_grad_()
        ys = [layer(part) for part in xs.split(micro)]
        torch.cat(ys).backward(g)
        update_running_stats(layer)
        outs.append(torch.cat(ys).detach())
        grads.append((xs.grad, layer.weight.grad, layer.bias.grad))
        running.append((layer.running_mean.clone(), layer.running_var.clone()))
    for o, gr, r in zip(outs[1:], grads[1:], running[1:]):
        assert (o - outs[0]).abs().max() < 1e-12
        assert all((a - b).abs().max() < 1e-10 for a, b in zip(gr, grads[0]))
        assert all((a - b).abs().max() < 1e-12 for a, b in zip(r, running[0]))


def _per_group_functional(x, gy, weight, bias):
    """One F.batch_norm per group of 64 (torch's own kernel), forward and backward, in x's dtype: (y, dx, dgamma,
    dbeta, [sum of group means, sum of unbiased group variances])."""
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    stats = torch.zeros(2, x.shape[0] // 64, x.shape[1], dtype=x.dtype)
    y = torch.cat([F.batch_norm(p, stats[0, i], stats[1, i], weight, bias, True, 1.0, 1e-5)
                   for i, p in enumerate(x.split(64))])
    y.backward(gy)
    return y.detach(), x.grad, weight.grad, bias.grad, torch.cat([stats[0].sum(0), stats[1].sum(0)])


@pytest.mark.parametrize("shape, dtype, memory_format", [
    ((192, 5, 4, 4), torch.float64, torch.contiguous_format), ((192, 5, 4, 4), torch.float64, torch.channels_last),
    ((192, 7), torch.float64, None), ((128, 3, 10), torch.float64, None), ((192, 5, 4, 4), torch.float32, None)])
def test_local_groups_equal_per_group_native_batch_norm(shape, dtype, memory_format):
    """All groups in one batched computation equal one F.batch_norm per group of 64, forward and backward, to
    round-off (the per-group loop was the implementation before); the output keeps the input's memory format."""
    torch.manual_seed(1)
    x = (torch.randn(shape) * 3 + 2).to(dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    x.requires_grad_()
    g = torch.randn(shape, dtype=dtype)
    layer = GhostBatchNorm2d(shape[1], 64).to(dtype)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    y = layer(x)
    y.backward(g)
    refs = _per_group_functional(x, g, layer.weight, layer.bias)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    for mine, ref in zip((y, x.grad, layer.weight.grad, layer.bias.grad, layer.stat_accumulator[:-1]), refs):
        assert (mine - ref).abs().max() <= tol * max(1.0, ref.abs().max().item())
    if memory_format is not None:
        assert y.is_contiguous(memory_format=memory_format)


def test_local_groups_vmap_over_stacked_layers():
    """torch.func.vmap over stacked parameters and buffers (packed runs) gives each layer's own result, and the
    running-statistic accumulators of the stacked buffers are updated in place."""
    from torch.func import functional_call, stack_module_state, vmap

    torch.manual_seed(2)
    layers = [GhostBatchNorm2d(5, 64).double() for _ in range(3)]
    for layer in layers:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
    params, buffers = stack_module_state(layers)
    x = torch.randn(3, 128, 5, 4, 4, dtype=torch.float64)
    ys = vmap(lambda p, bf, xx: functional_call(layers[0], (p, bf), (xx,)))(params, buffers, x)
    for r, layer in enumerate(layers):
        assert (ys[r] - layer(x[r])).abs().max() < 1e-13
        assert (buffers["stat_accumulator"][r] - layer.stat_accumulator).abs().max() < 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("device", [
    "cpu",  # gloo
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 4,
                                                                    reason="nccl needs 4 GPUs for 4 ranks")]),
])
def test_groups_across_four_ranks_equal_one_batch_norm(tmp_path, device):
    out = tmp_path / "ghost_bn.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
           str(ROOT / "tests" / "ghost_bn_worker.py"), str(out), device]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=harness_env(OMP_NUM_THREADS=1), timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    for kind, r in results.items():
        assert r["ranks_per_group"] == 4 and r["groups_counted"] == 1, (kind, r)  # running stats: the group once
        for key in ("output", "input_grad", "gamma_grad", "beta_grad", "running_mean", "running_var"):
            assert r[key] < 1e-10, (kind, key, r[key])
        assert r["local_only_output"] > 1e-2, (kind, r)  # per-rank statistics would be told apart


def test_dropout_mask_follows_the_example_key():
    keys = torch.arange(100, dtype=torch.int64) * 7919 - 3
    mask = keep_mask(keys, 0, (5, 40), 0.5)
    assert mask.shape == (100, 5, 40)
    assert torch.equal(keep_mask(keys[60:], 0, (5, 40), 0.5), mask[60:])  # same key, same mask, any batch
    assert not torch.equal(keep_mask(keys, 1, (5, 40), 0.5), mask)  # another layer draws another mask
    assert abs(mask.double().mean().item() - 0.5) < 0.02
    assert abs(keep_mask(keys, 0, (5, 40), 0.2).double().mean().item() - 0.8) < 0.02

    layer = torch.nn.Sequential(KeyedDropout(0.5))
    x = torch.ones(100, 5, 40)
    with pytest.raises(RuntimeError, match="per-example keys"):
        layer(x)
    with dropout_keys(layer, keys):
        y = layer(x)
    assert torch.equal(y, mask.double().float() * 2.0)
    layer.eval()
    assert torch.equal(layer(x), x)


def _run_layer(implementation, x, gy, weight, bias):
    """Forward and backward of a fresh layer in x's dtype: (y, dx, dgamma, dbeta, the running-statistic accumulator)."""
    layer = GhostBatchNorm2d(x.shape[1], 64, implementation=implementation).to(x.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    xx = x.detach().clone().requires_grad_()
    y = layer(xx)
    y.backward(gy)
    return y.detach(), xx.grad, layer.weight.grad, layer.bias.grad, layer.stat_accumulator.clone()


@pytest.mark.parametrize("shape, memory_format", [
    ((256, 5, 4, 4), torch.contiguous_format), ((256, 5, 4, 4), torch.channels_last), ((192, 7), None),
    ((128, 3, 10), None)])
def test_cpu_per_group_and_gpu_batched_implementations_are_equal(shape, memory_format):
    """The CPU path (native kernels per group) and the GPU path (all groups batched) give the same output, input,
    gamma and beta gradients and group statistics in fp64, whatever the layout of the input."""
    torch.manual_seed(3)
    x = (torch.randn(shape) * 3 + 2).double()
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    gy = torch.randn(shape, dtype=torch.float64)
    weight, bias = torch.rand(shape[1]).double() + 0.5, torch.randn(shape[1]).double()
    cpu, gpu = (_run_layer(impl, x, gy, weight, bias) for impl in ("per_group", "batched"))
    for a, b in zip(cpu, gpu):
        assert (a - b).abs().max() < 1e-12 * max(1.0, b.abs().max().item())
    if memory_format is not None:
        assert cpu[0].is_contiguous(memory_format=memory_format)


def test_cpu_per_group_statistics_survive_a_large_mean_in_fp32():
    """The CPU path takes each group's variance as the mean of squared deviations from the group mean (two passes,
    as torch's batch norm), not E[x^2] - E[x]^2, which in fp32 loses every digit once the mean is 1e4 times the
    spread (variances of 0 or +-8 here, for a true 0.25). Against an fp64 reference, its fp32 output, gradients and
    group statistics are as accurate as torch's own fp32 batch norm per group (within 4x its error, which fp32's
    resolution at 1e4 sets)."""
    torch.manual_seed(4)
    shape = (128, 6, 5, 5)
    x, gy = (torch.randn(shape) * 0.5 + 1e4).double(), torch.randn(shape).double()  # values fp32 holds exactly
    weight, bias = (torch.rand(shape[1]) + 0.5).double(), torch.randn(shape[1]).double()
    ref = _per_group_functional(x, gy, weight, bias)
    torch_fp32 = _per_group_functional(*(t.float() for t in (x, gy, weight, bias)))
    mine = _run_layer("per_group", *(t.float() for t in (x, gy, weight, bias)))
    mine = (*mine[:4], mine[4][:-1])  # the accumulator's last entry is the group count
    for name, a, b, r in zip(("y", "dx", "dgamma", "dbeta", "statistics"), mine, torch_fp32, ref):
        scale = max(1.0, r.abs().max().item())
        error, torch_error = ((t.double() - r).abs().max().item() / scale for t in (a, b))
        assert error <= 4 * torch_error + 1e-6, (name, error, torch_error)


def test_implementation_is_chosen_by_device_and_dtype():
    from models.ghost_bn import implementation_for, local_groups

    assert implementation_for("cpu", torch.float32, torch.float32) == "per_group"
    assert implementation_for("cpu", torch.float64, torch.float64) == "per_group"
    assert implementation_for("cpu", torch.bfloat16, torch.float32) == "batched"  # mixed precision: fp32 statistics
    assert implementation_for("cuda", torch.float32, torch.float32) == "batched"  # the GPU path, unchanged
    with pytest.raises(ValueError, match="auto, batched or per_group"):
        GhostBatchNorm2d(4, 64, implementation="fast")
    # bf16 activations on CPU (autocast) take the batched path and keep their dtype.
    x = torch.randn(128, 4, 3, 3).bfloat16()
    y, mean, var = local_groups(x, torch.ones(4), torch.zeros(4), 64, 1e-5)
    assert y.dtype == torch.bfloat16 and mean.dtype == var.dtype == torch.float32 and mean.shape == (2, 4)


def test_implementations_are_equal_under_vmap_over_stacked_layers():
    """Packed runs (torch.func.vmap over stacked parameters and buffers): the per-group path folds the runs into its
    groups (its vmap rule); output, the gradients of the stacked gamma, beta and of the input, and the stacked
    accumulators equal the batched path's in fp64."""
    from torch.func import functional_call, stack_module_state, vmap

    torch.manual_seed(4)
    x = torch.randn(3, 128, 5, 4, 4, dtype=torch.float64)
    gy = torch.randn_like(x)
    got = []
    for impl in ("per_group", "batched"):
        torch.manual_seed(5)
        layers = [GhostBatchNorm2d(5, 64, implementation=impl).double() for _ in range(3)]
        for layer in layers:
            with torch.no_grad():
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-1, 1)
        params, buffers = stack_module_state(layers)
        xx = x.clone().requires_grad_()
        ys = vmap(lambda p, bf, xi: functional_call(layers[0], (p, bf), (xi,)))(params, buffers, xx)
        ys.backward(gy)
        got.append((ys.detach(), xx.grad, params["weight"].grad, params["bias"].grad, buffers["stat_accumulator"]))
        if impl == "per_group":  # and each run is its own layer
            for r, layer in enumerate(layers):
                assert (ys[r] - layer(x[r])).abs().max() < 1e-13
    for a, b in zip(*got):
        assert (a - b).abs().max() < 1e-12 * max(1.0, b.abs().max().item())


def test_compiled_layer_equals_the_eager_cpu_path():
    """Under torch.compile the layer runs the batched Function (written for tracing); it equals the eager CPU path
    (per group) in fp64, forward and backward. aot_eager: the same graph capture as inductor, without C++ builds."""
    torch.manual_seed(6)
    x = (torch.randn(128, 4, 3, 3) * 2 + 1).double()
    gy = torch.randn_like(x)
    weight, bias = torch.rand(4).double() + 0.5, torch.randn(4).double()
    eager = _run_layer("auto", x, gy, weight, bias)
    layer = GhostBatchNorm2d(4, 64).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    xx = x.clone().requires_grad_()
    y = torch.compile(layer, backend="aot_eager", fullgraph=True)(xx)
    y.backward(gy)
    for a, b in zip((y.detach(), xx.grad, layer.weight.grad, layer.bias.grad, layer.stat_accumulator), eager):
        assert (a - b).abs().max() < 1e-12 * max(1.0, b.abs().max().item())
