"""R runs of one model as ONE batched model: their parameters and buffers stacked on a leading run dimension and
the model's own forward mapped over it with torch.func.vmap (functional_call on the family's ordinary module).

vmap turns R convolutions into one grouped convolution, R linear layers into one batched product, and batch norm
into one normalization over R x C channels, so one device runs R small runs as fast as one large one. Each run
keeps its own weights, ghost-BN running statistics (updated in place through the stacked buffers), dropout masks
(its examples' keys) and loss; nothing mixes between runs: the loss summed over runs has, for each run's
parameters, exactly that run's gradient.

A run's checkpoint is written in the trainer's own format (model state_dict, torch SGD state_dict, TrainState),
so a packed run may resume packed or alone, and a run trained alone may join a pack.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.func import functional_call, stack_module_state, vmap

from harness.recipe.optim import build_optimizer, norm_parameters, param_groups
from models.ghost_bn import GhostBatchNorm, fold_statistics


class _Bound(nn.Module):
    """The template module called with one run's parameters and buffers (inside vmap: that run's slice)."""

    def __init__(self, template: nn.Module, tensors: dict):
        super().__init__()
        self.template = template  # a child, so dropout_keys finds its KeyedDropout layers
        self.tensors = tensors

    def forward(self, *args):
        return functional_call(self.template, self.tensors, args)


class PackedModel:
    def __init__(self, models: list[nn.Module]):
        self.template = models[0]
        self.params, self.buffers = stack_module_state(models)
        self.runs = len(models)
        self.names = list(self.params)
        exempt = norm_parameters(self.template)
        self.norm_names = {n for n, p in self.template.named_parameters() if id(p) in exempt}
        self.ghost_layers = [n for n, m in self.template.named_modules() if isinstance(m, GhostBatchNorm)]
        self.state_keys = list(self.template.state_dict())

    def tensors(self) -> list[torch.Tensor]:
        return [self.params[n] for n in self.names]

    def __call__(self, objective, batch: tuple, shared: bool = False):
        """objective(model, batch) for every run at once: (loss_sum (R,), stats (R, k)). `shared`: the same batch
        for every run (evaluation), else each tensor of the batch has a leading run dimension."""
        def one(params, buffers, *parts):
            return objective(_Bound(self.template, {**params, **buffers}), parts)

        dims = (0, 0, *([None if shared else 0] * len(batch)))
        return vmap(one, in_dims=dims)(self.params, self.buffers, *batch)

    def train(self, mode: bool = True) -> None:
        self.template.train(mode)

    @torch.no_grad()
    def fold_running_stats(self) -> None:
        """ghost_bn.update_running_stats of every run at once (one process: no reduction over ranks)."""
        for name in self.ghost_layers:
            layer = self.template.get_submodule(name)
            acc = self.buffers[f"{name}.stat_accumulator"]
            fold_statistics(self.buffers[f"{name}.running_mean"], self.buffers[f"{name}.running_var"], acc, layer.momentum)
            acc.zero_()

    def state_dict(self, r: int) -> dict[str, torch.Tensor]:
        """Run r's model state_dict, with the template's names (persistent buffers included, as torch's)."""
        both = {**self.params, **self.buffers}
        return {k: both[k][r].detach().clone() for k in self.state_keys}

    @torch.no_grad()
    def load_state_dict(self, r: int, state: dict) -> None:
        for k, t in {**self.params, **self.buffers}.items():
            if k in state:
                t[r].copy_(state[k])

    def _module(self, r: int) -> nn.Module:
        module = copy.deepcopy(self.template)
        module.load_state_dict(self.state_dict(r))
        return module

    def optimizer_state(self, r: int, buffers: dict, name: str, momentum: float, weight_decay: float,
                        exclude_norm: bool) -> dict:
        """Run r's momentum buffers as the state_dict of the torch SGD the trainer would have built."""
        module = self._module(r)
        opt = build_optimizer(param_groups(module, exclude_norm), name, momentum, weight_decay)
        if momentum > 0:
            for n, p in module.named_parameters():
                opt.state[p]["momentum_buffer"] = buffers[n][r].detach().clone()
        return opt.state_dict()

    @torch.no_grad()
    def load_optimizer_state(self, r: int, state: dict, buffers: dict, name: str, momentum: float,
                             weight_decay: float, exclude_norm: bool) -> None:
        module = self._module(r)
        opt = build_optimizer(param_groups(module, exclude_norm), name, momentum, weight_decay)
        opt.load_state_dict(state)
        for n, p in module.named_parameters():
            buf = opt.state.get(p, {}).get("momentum_buffer")
            buffers[n][r].copy_(buf if buf is not None else torch.zeros_like(p))
