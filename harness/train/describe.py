"""`harness plan`: what a run would be, before any allocation is spent: its batch plan, parameter count and
budget in steps, from the config alone (the model is built on the meta device: no memory, no initialisation)."""

from __future__ import annotations

from harness.recipe.budget import examples_per_epoch
from harness.train.config import Config, durations_of, plan_of


def describe_run(cfg: Config, world_size: int) -> tuple[dict, str]:
    """({world_size, micro_batch_size, accumulation_steps, global_batch_size, ghost_batch_size, parameters, model,
    steps, epochs, train_examples, data_source, examples_per_epoch}, the plan as arithmetic)."""
    from dataclasses import replace

    import torch

    import models
    from data_pipelines import describe
    from data_pipelines.config import train_examples_of
    from harness.core.configlib import to_dict

    plan = plan_of(cfg, world_size)
    spec, source = describe(cfg.data.name, cfg.data.path)
    spec = replace(spec, num_train=train_examples_of(to_dict(cfg.data), spec.num_train))  # data.train_examples
    durations = durations_of(cfg, spec)
    with torch.device("meta"):  # shapes only (ResNet-50, WRN-28-10 on a login node)
        n_params = models.count_parameters(models.build_model(cfg.model, spec))
    per_epoch = examples_per_epoch(spec.task, spec.num_train, plan.global_batch_size, cfg.model.sequence_length())
    return ({**plan.as_dict(), "parameters": n_params, "model": cfg.model.name, "steps": durations.total_steps,
             "epochs": durations.epochs, "train_examples": spec.num_train, "data_source": source,
             "examples_per_epoch": per_epoch}, plan.describe())
