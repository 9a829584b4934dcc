"""The effective learning rate, converted to torch's rate in one place, and the optimizer it drives.

Heavy-ball momentum (sec. 3.1): v <- m v + g; w <- w - lr v, which is torch.optim.SGD with dampening 0
and no Nesterov. eps_eff = lr / (1 - m) (sec. 3.3); plain SGD has m = 0 so eps_eff = lr.
L2 regularization is applied as weight decay (SGD adds wd * w to the gradient, the same thing).
"""

from __future__ import annotations


def momentum_of(name: str, momentum: float) -> float:
    return momentum if name == "momentum" else 0.0


def torch_lr(effective_lr: float, momentum: float) -> float:
    """torch's lr for an effective rate: lr = eps_eff (1 - m)."""
    return effective_lr * (1.0 - momentum)


def build_optimizer(params, name: str, momentum: float, weight_decay: float, fused: bool = False):
    """torch.optim.SGD with the paper's momentum convention (torch is imported here, not with the module).
    fused: torch's fused kernel (every parameter in one kernel; CPU and CUDA), the same arithmetic as its
    foreach and for-loop implementations (tests/test_schedule.py compares them)."""
    import torch

    # The rate is set by the schedule before every step; 0.0 here is a placeholder.
    return torch.optim.SGD(
        params, lr=0.0, momentum=momentum_of(name, momentum), dampening=0.0, nesterov=False, weight_decay=weight_decay,
        fused=fused or None,
    )


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def norm_parameters(model) -> set[int]:
    """ids of the parameters of normalization layers (batch-norm gammas and betas: torch's norm layers and any
    module marking itself `normalizes = True`, as GhostBatchNorm does)."""
    import torch.nn as nn

    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    return {id(p) for m in model.modules() if isinstance(m, norms) or getattr(m, "normalizes", False)
            for p in m.parameters(recurse=False)}


def param_groups(model, exclude_norm: bool) -> list[dict]:
    """The optimizer's parameter groups. With `exclude_norm`, the normalization layers' parameters get
    weight_decay 0, as Goyal et al. 2017 sec. 5.1 ("we do not apply weight decay on the learnable BN
    coefficients"); biases of other layers keep it. Otherwise one group: weight decay on everything, as the
    paper's L2 (sec. 4)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not exclude_norm:
        return [{"params": params}]
    exempt = norm_parameters(model)
    return [{"params": [p for p in params if id(p) not in exempt]},
            {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0}]
