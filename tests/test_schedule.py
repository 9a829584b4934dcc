"""The paper's schedule (appendix B.1) and the effective learning rate (sec. 3.3)."""

import pytest
import torch

from harness.recipe.optim import build_optimizer, set_lr, torch_lr
from harness.recipe.schedule import decay_factor, lr_at, num_drops


def test_worked_example_from_the_protocol():
    total, lr0 = 9765, 1.0
    rates = [lr_at(s, total, lr0, 2.0) for s in range(total)]
    assert all(r == lr0 for r in rates[:4882])  # steps 0..4881 at lr
    drops = [s for s in range(1, total) if rates[s] < rates[s - 1]]
    assert drops == [4882 + k * 488 for k in range(10)]  # 4882, 5370, ..., 9274
    assert drops[-1] == 9274 and len(drops) == 10  # never an 11th drop from flooring
    assert rates[-1] == lr0 / 1024 and rates[9274] == lr0 / 1024


def test_final_rate_sets_gamma():
    gamma = decay_factor(8.0, final=8.0 / 1000)
    assert gamma == pytest.approx(1000 ** 0.1)
    assert lr_at(99, 100, 8.0, gamma) == pytest.approx(8.0 / 1000)


def test_short_runs_and_warmup():
    assert [num_drops(s, 10) for s in range(10)] == [0] * 5 + [10] * 5
    assert lr_at(0, 100, 1.0, 2.0, warmup_steps=4) == 0.25 and lr_at(4, 100, 1.0, 2.0, warmup_steps=4) == 1.0


def _steps(name, effective_lr, n, momentum=0.9):
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = build_optimizer([w], name, momentum, 0.0)
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    updates = []
    for _ in range(n):
        before = w.detach().clone()
        w.grad = g.clone()
        set_lr(opt, torch_lr(effective_lr, momentum if name == "momentum" else 0.0))
        opt.step()
        updates.append(w.detach() - before)
    return g, updates


def test_effective_lr_converts_once():
    """Momentum at eps_eff = x against SGD at lr = x. With the protocol's update (torch SGD, dampening 0:
    v <- m v + g, w <- w - lr v, v starting at g) the FIRST momentum step is lr g = (1 - m) x g, and on a
    steady gradient the step grows to lr g / (1 - m) = x g, SGD's step: that is what eps_eff means."""
    x = 0.3
    g, sgd = _steps("sgd", x, 200)
    _, mom = _steps("momentum", x, 200)
    torch.testing.assert_close(sgd[0], -x * g, rtol=0, atol=1e-15)
    torch.testing.assert_close(mom[0], -(1 - 0.9) * x * g, rtol=0, atol=1e-15)
    torch.testing.assert_close(mom[-1], sgd[-1], rtol=1e-9, atol=0)
