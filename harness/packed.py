"""Packed runs: many small runs that differ only in learning rate, seed or optimizer, trained together as
ONE batched model in one process, each into its own ordinary run directory.

Why: a digits MLP step takes microseconds; one process per run pays 2-3 s of start-up, and one tiny model
at a time leaves the cores idle. Stacking R runs' weights on a leading dimension turns R small matrix
products into one batched product (torch.baddbmm) and R optimizer updates into a few vector operations.

What stays the same as `harness.trainer.train` for each run (tests/test_packed.py checks it in fp64):
- initial weights: torch.manual_seed(seed) then the model builder, exactly as the trainer;
- data: global batch i is stream positions [iB, (i+1)B) of the run's own `ExampleOrder(N, seed)`, with
  per-example keyed augmentation (data_pipelines/order.py, augment.py), cut into the same micro-batches;
- the loss: each micro-batch's loss sum / B, accumulated (eq. 1); the schedule `harness.schedule.lr_at`;
- the update of torch.optim.SGD (dampening 0, no Nesterov): g += wd w; buf = m buf + g (buf = g at the
  first step); w -= lr buf, with each run's own lr, m and wd as vectors over the run dimension;
- divergence, logging, evaluation, final.pt, result.json, metrics.jsonl and tb/ in the same format.
What differs: floating-point rounding (batched kernels; fused multiply-adds), last bits in fp64. A packed
run writes no mid-run checkpoints: an interrupted pack starts again from step 0 (packs are small).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from data_pipelines import ReaderOptions, build_data, examples_per_epoch
from data_pipelines.augment import crop_flip_params
from data_pipelines.order import ExampleOrder, example_keys
from harness import distributed, objectives, provenance
from harness.config import Config, check_resumable, to_yaml
from harness.errors import ConfigError
from harness.optim import momentum_of, torch_lr
from harness.plan import make_batch_plan, to_steps
from harness.rundir import RunLog, atomic_save_torch, atomic_write_json, atomic_write_text, read_json
from harness.schedule import decay_factor, lr_at, num_drops
from harness.trainer import DTYPES

# Keys in which the runs of one pack may differ; everything else must be equal.
PACK_KEYS = ("seed", "optim.name", "optim.momentum", "optim.effective_lr", "optim.weight_decay",
             "schedule.final_lr", "schedule.decay_factor")
# Families whose model is a plain Sequential of Flatten / Linear / ReLU (no batch norm, no dropout).
PACKABLE_MODELS = ("mlp",)


def pack_key(config: dict) -> Optional[str]:
    """Runs with the same key can train as one pack; None: this run trains alone (why: `unpackable_reason`)."""
    if unpackable_reason(config):
        return None
    from harness.config import flatten

    rest = {k: v for k, v in flatten(config).items() if k not in PACK_KEYS}
    return json.dumps(rest, sort_keys=True)


def unpackable_reason(config: dict) -> str:
    if config["model"]["name"] not in PACKABLE_MODELS:
        return f"model {config['model']['name']} is not packable (only {', '.join(PACKABLE_MODELS)})"
    if config["optim"].get("grad_clip_norm") is not None:
        return "gradient clipping"
    if config["precision"] not in ("fp32", "fp64") or config["backend"] != "ddp":
        return "precision bf16 or backend deepspeed"
    return ""


class NotPackable(ConfigError):
    """The model is not a plain Sequential of Flatten/Linear/ReLU: its runs train one by one instead."""


class BatchedSequential:
    """R copies of a Sequential(Flatten | Linear | ReLU ...) as stacked parameters. Linear weights are stored
    transposed, (R, in, out), so the forward pass is one torch.baddbmm per layer without a transpose."""

    def __init__(self, template: nn.Module, states: list[dict[str, torch.Tensor]]):
        if not isinstance(template, nn.Sequential):
            raise NotPackable(f"packed runs need an nn.Sequential model, got {type(template).__name__}")
        for module in template:
            if not isinstance(module, (nn.Flatten, nn.Linear, nn.ReLU)):
                raise NotPackable(f"packed runs need a Sequential of Flatten/Linear/ReLU; found {type(module).__name__}")
            if isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) != (1, -1):
                raise NotPackable("packed runs need nn.Flatten() with its default dimensions")
        if list(template.buffers()):
            raise NotPackable("packed runs need a model without buffers (batch norm running statistics)")
        self.template = template
        self.names = [name for name, _ in template.named_parameters()]
        self.params = {}
        for n in self.names:
            stacked = torch.stack([s[n].detach() for s in states])
            if n.endswith("weight"):
                stacked = stacked.transpose(1, 2).contiguous()
            elif n.endswith("bias"):
                stacked = stacked.unsqueeze(1)
            self.params[n] = stacked.requires_grad_()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (R, b, *in_shape) -> logits (R, b, classes)."""
        h = x
        for i, module in enumerate(self.template):
            if isinstance(module, nn.Flatten):
                h = h.flatten(2)
            elif isinstance(module, nn.Linear):
                w, b = self.params[f"{i}.weight"], self.params.get(f"{i}.bias")
                h = torch.baddbmm(b, h, w) if b is not None else torch.bmm(h, w)
            else:
                h = torch.relu(h)
        return h

    def tensors(self) -> list[torch.Tensor]:
        return [self.params[n] for n in self.names]

    def state_dict(self, r: int) -> dict[str, torch.Tensor]:
        """Run r's parameters with the template's names and shapes (weight (out, in), bias (out,))."""
        out = {}
        for n in self.names:
            t = self.params[n][r].detach()
            out[n] = (t.t() if n.endswith("weight") else t.squeeze(0)).contiguous().clone()
        return out


def _per_run(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """A (R, 1, 1, ...) tensor broadcasting against a stacked parameter."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.dim() - 1)))


def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-run L2 norm over all tensors (R,), in float64."""
    total = sum(t.detach().double().pow(2).flatten(1).sum(1) for t in tensors)
    return total.sqrt()


def stream_batch(data, seed: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream positions [start, stop) of the run with this seed, exactly as InMemoryImages.train_micro_batches
    builds them (same order, same per-example augmentation keys, same crop and normalization)."""
    order = ExampleOrder(len(data.train_y), seed)
    idx, epochs = order.lookup(start, stop)
    index = torch.from_numpy(idx).to(data.device)
    keys = example_keys(seed, epochs, idx)
    if data.pad or data.flip:
        dy, dx, fl = crop_flip_params(keys, data.pad, data.flip)
    else:
        dy = dx = np.full(len(idx), data.pad, dtype=np.int64)
        fl = np.zeros(len(idx), dtype=bool)
    return data._normalize(data.train.crop(index, dy, dx, fl)), data.train_y[index]


class _Streams:
    """Each distinct seed's stream, produced in chunks of steps (bounded memory), indexed per run."""

    def __init__(self, data, seeds: list[int], batch: int, total_steps: int, budget_elems: int = 1 << 23):
        self.data, self.batch, self.total = data, batch, total_steps
        self.seeds = sorted(set(seeds))
        self.run_index = torch.tensor([self.seeds.index(s) for s in seeds], device=data.device)
        per_step = batch * max(1, math.prod(data.train_x.shape[1:]))
        self.chunk = max(1, budget_elems // (per_step * len(self.seeds)))
        self.lo = self.hi = 0
        self.x = self.y = None

    def set_runs(self, seeds: list[int]) -> None:
        self.run_index = torch.tensor([self.seeds.index(s) for s in seeds], device=self.data.device)

    def step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.lo <= step < self.hi:
            self.lo, self.hi = step, min(self.total, step + self.chunk)
            parts = [stream_batch(self.data, s, self.lo * self.batch, self.hi * self.batch) for s in self.seeds]
            self.x = torch.stack([p[0] for p in parts]).unflatten(1, (self.hi - self.lo, self.batch))
            self.y = torch.stack([p[1] for p in parts]).unflatten(1, (self.hi - self.lo, self.batch))
        i = step - self.lo
        return self.x[:, i].index_select(0, self.run_index), self.y[:, i].index_select(0, self.run_index)


def train_pack(cfgs: list[Config], run_dirs: list[Path], stop: Optional[Callable[[], bool]] = None,
               on_result: Optional[Callable[[int, dict], None]] = None) -> list[Optional[dict]]:
    """Train runs that share everything but PACK_KEYS as one batched model; return each run's result
    (None for a run left unfinished because `stop()` turned true)."""
    started = time.time()
    keys = {pack_key(_as_dict(c)) for c in cfgs}
    if None in keys or len(keys) != 1:
        raise ConfigError("these runs cannot form one pack: they differ in more than " + ", ".join(PACK_KEYS))
    cfg0 = cfgs[0]
    env = distributed.setup(cfg0.device)
    if env.world_size != 1:
        raise ConfigError("packed runs train in one process; run the sweep executor without torchrun")
    results: list[Optional[dict]] = [None] * len(cfgs)
    todo = []
    for i, (cfg, run_dir) in enumerate(zip(cfgs, run_dirs)):
        run_dir = Path(run_dir)
        done = run_dir / "result.json"
        if done.exists():
            check_resumable(run_dir, cfg)
            old = read_json(done)
            if old.get("status") in ("completed", "diverged"):
                results[i] = old
                continue
        check_resumable(run_dir, cfg)
        todo.append(i)
    if not todo:
        return results

    dtype = DTYPES[cfg0.precision]
    b = cfg0.batch.global_batch_size
    plan = make_batch_plan(b, 1, cfg0.batch.micro_batch_size, cfg0.batch.max_micro_batch_size, cfg0.model.ghost_group_size())
    data = build_data(cfg0.data.name, cfg0.data.path, cfg0.data.augment, cfg0.data.eval_batch_size, plan,
                      cfg0.seed, 0, env.device, dtype, ReaderOptions.of(cfg0.data), cfg0.model.task,
                      cfg0.model.sequence_length())
    if data.spec.task != "classification" or not hasattr(data, "train"):
        raise NotPackable(f"packed runs need in-memory classification data, not {data.spec.task} ({type(data).__name__})")
    d = to_steps(cfg0.budget.steps, cfg0.budget.epochs, examples_per_epoch(data.spec, b, cfg0.model.sequence_length()),
                 b, cfg0.eval.every_steps, cfg0.eval.every_epochs, cfg0.checkpoint.every_steps, cfg0.checkpoint.every_epochs)
    objective = objectives.for_task(data.spec.task)
    run_cfgs = [cfgs[i] for i in todo]
    dirs = [Path(run_dirs[i]) for i in todo]

    states, template = [], None
    for cfg in run_cfgs:
        torch.manual_seed(cfg.seed)  # the trainer's initial weights, run by run
        model = models.build_model(cfg.model, data.spec).to(env.device, dtype)
        template = template or model
        states.append(model.state_dict())
    net = BatchedSequential(template, states)
    n_params = models.count_parameters(template)
    moms = [momentum_of(c.optim.name, c.optim.momentum) for c in run_cfgs]
    eps0 = [c.optim.effective_lr for c in run_cfgs]
    gammas = [decay_factor(c.optim.effective_lr, c.schedule.decay_factor, c.schedule.final_lr) for c in run_cfgs]
    tensors = net.tensors()
    mom_t = [_per_run(moms, p) for p in tensors]
    wd_t = [_per_run([c.optim.weight_decay for c in run_cfgs], p) for p in tensors]
    bufs = [torch.zeros_like(p) for p in tensors]

    logs = []
    environment = {**provenance.environment(env, plan), "packed_runs": len(run_cfgs)}  # once: it runs git
    for cfg, run_dir in zip(run_cfgs, dirs):
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(run_dir / "tb", ignore_errors=True)  # from an interrupted attempt: a pack restarts at step 0
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        atomic_write_json(run_dir / "env.json", environment)
        logs.append(RunLog(run_dir, True, cfg.log.tensorboard))
    streams = _Streams(data, [c.seed for c in run_cfgs], b, d.total_steps)

    R, S = len(run_cfgs), d.total_steps
    dev = env.device
    alive = torch.ones(R, dtype=torch.bool, device=dev)
    tail_start = S - max(1, S // 20)
    tail_sum = torch.zeros(R, dtype=torch.float64, device=dev)
    tail_n = 0
    diverged_at: list[Optional[int]] = [None] * R
    train_seconds, last_drops, effs = 0.0, None, None
    max_loss = cfg0.divergence.max_loss
    for step in range(S):
        if stop is not None and stop():
            for log in logs:
                log.close()
            return results
        drops = num_drops(step, S)
        if drops != last_drops or step < cfg0.schedule.warmup_steps:
            effs = [lr_at(step, S, eps0[r], gammas[r], cfg0.schedule.warmup_steps) for r in range(R)]
            lrs = [torch_lr(e, m) for e, m in zip(effs, moms)]
            neg_lr = [-_per_run(lrs, p) * alive.view(-1, *([1] * (p.dim() - 1))) for p in tensors]
            last_drops = drops
        want_log = (step + 1) % cfg0.log.every_steps == 0 or step + 1 == S
        t0 = time.perf_counter()
        x, y = streams.step(step)
        loss_sum = correct = 0
        for a in range(plan.accumulation_steps):
            lo, hi = plan.micro_slice(a, 0)
            xm, ym = x[:, lo:hi], y[:, lo:hi]
            logits = net(xm)
            per_run = F.cross_entropy(logits.flatten(0, 1), ym.flatten(), reduction="none").view(R, -1).sum(1)
            (per_run * (1.0 / b)).sum().backward()  # the trainer's loss_sum * W / B, per run
            loss_sum = loss_sum + per_run.detach().double()
            correct = correct + (logits.detach().argmax(-1) == ym).sum(1).double()
        norms = {}
        with torch.no_grad():
            grads = [p.grad for p in tensors]
            if want_log:
                norms["grad_norm"] = _norms(grads)
                before = [p.detach().clone() for p in tensors]
            for p, g, buf, m, wd, nlr in zip(tensors, grads, bufs, mom_t, wd_t, neg_lr):
                g.addcmul_(p, wd)  # torch.optim.SGD: grad = grad + weight_decay * param
                buf.mul_(m).add_(g)  # buf = m buf + g; buf starts at 0, so the first step gives buf = g
                p.addcmul_(buf, nlr)  # param = param - lr buf
                p.grad = None
            if want_log:
                norms["param_norm"] = _norms(tensors)
                norms["update_norm"] = _norms([p - q for p, q in zip(tensors, before)])
        train_seconds += time.perf_counter() - t0
        losses = loss_sum / b
        if step >= tail_start:
            tail_sum += torch.where(alive, losses, 0.0)
            tail_n += 1
        bad = ~torch.isfinite(losses) if max_loss is None else ~(torch.isfinite(losses) & (losses <= max_loss))
        dead_now = (bad & alive).nonzero().flatten().tolist()
        for r in dead_now:
            diverged_at[r] = step + 1
        if dead_now:
            alive[dead_now] = False
        if want_log:
            rate = (step + 1) * b / max(train_seconds, 1e-9)
            lv, av = losses.tolist(), (100.0 * correct / b).tolist()
            nv = {k: v.tolist() for k, v in norms.items()}
            for r in alive.nonzero().flatten().tolist():
                logs[r].write({"step": step + 1, "epoch": (step + 1) / (S / d.epochs), "train_loss": lv[r],
                               "train_accuracy": av[r], "lr": torch_lr(effs[r], moms[r]), "effective_lr": effs[r],
                               "temperature": effs[r] / b, "examples_per_second": rate, **{k: v[r] for k, v in nv.items()}})
        if dead_now:
            with torch.no_grad():  # keep NaNs out of the batched arithmetic: these runs are over
                for p, buf, nlr in zip(tensors, bufs, neg_lr):
                    p[dead_now] = 0.0
                    buf[dead_now] = 0.0
                    nlr[dead_now] = 0.0
            ts = tail_sum.tolist()
            for r in dead_now:
                res = _result(run_cfgs[r], "diverged", step + 1, d, ts[r], tail_n, objective, {}, diverged_at[r],
                              (step + 1) * b / max(train_seconds, 1e-9), time.time() - started, n_params, plan, R)
                _finish(dirs[r], res, logs[r], None, None)
                results[todo[r]] = res
                if on_result:
                    on_result(todo[r], res)
        if not alive.any():
            break
        if d.eval_every and (step + 1) % d.eval_every == 0 and step + 1 < S:
            ev = evaluate(net, data, objective)
            for r in alive.nonzero().flatten().tolist():
                logs[r].write({"step": step + 1, **ev[r]})

    if alive.any():
        ev = evaluate(net, data, objective)
        ts = tail_sum.tolist()
        for r in alive.nonzero().flatten().tolist():
            logs[r].write({"step": S, **ev[r]})
            res = _result(run_cfgs[r], "completed", S, d, ts[r], tail_n, objective, ev[r], None,
                          S * b / max(train_seconds, 1e-9), time.time() - started, n_params, plan, R)
            _finish(dirs[r], res, logs[r], net.state_dict(r), run_cfgs[r])
            results[todo[r]] = res
            if on_result:
                on_result(todo[r], res)
    return results


def _as_dict(cfg: Config) -> dict:
    from harness.configlib import to_dict

    return to_dict(cfg)


@torch.no_grad()
def evaluate(net: BatchedSequential, data, objective) -> list[dict[str, float]]:
    """Every run's test metrics over the whole test split, in the trainer's eval batches."""
    R = next(iter(net.params.values())).shape[0]
    loss_sum = torch.zeros(R, dtype=torch.float64, device=data.device)
    correct = torch.zeros(R, dtype=torch.float64, device=data.device)
    count = 0
    for x, y in data.eval_batches():
        logits = net(x.unsqueeze(0).expand(R, *x.shape))
        loss_sum += F.cross_entropy(logits.flatten(0, 1), y.repeat(R), reduction="none").view(R, -1).sum(1).double()
        correct += (logits.argmax(-1) == y).sum(1).double()
        count += len(y)
    out = []
    for r in range(R):
        stats = torch.tensor([loss_sum[r].item(), float(count), correct[r].item()], dtype=torch.float64)
        out.append({f"test_{k}": v for k, v in objective.summarize(stats).items()})
    return out


def _result(cfg, status, steps, d, tail_sum, tail_n, objective, metrics, diverged_at, rate, wall, n_params, plan, packed) -> dict:
    """result.json in the trainer's format (harness.trainer.finish), plus how many runs shared the pack."""
    return {
        "status": status,
        "steps": steps,
        "total_steps": d.total_steps,
        "epochs": steps / (d.total_steps / d.epochs),
        "train_loss": tail_sum / tail_n if tail_n else None,
        **objective.train_summary(tail_sum / tail_n if tail_n else None),
        "test_metric": objective.metric,
        "higher_is_better": objective.higher_is_better,
        objective.metric: metrics.get(objective.metric),
        **{k: v for k, v in metrics.items() if k != objective.metric},
        "diverged_at_step": diverged_at,
        "examples_per_second": rate,
        "wall_seconds": wall,
        "parameters": n_params,
        "layout": plan.as_dict(),
        "segments": [{"world_size": 1, "from_step": 0, **provenance.slurm_info()}],
        "packed_runs": packed,
    }


def _finish(run_dir: Path, result: dict, log: RunLog, state: Optional[dict], cfg: Optional[Config]) -> None:
    if state is not None:
        atomic_save_torch(run_dir / "checkpoints" / "final.pt", {"model": state, "step": result["steps"], "config": to_yaml(cfg)})
    log.close()
    atomic_write_json(run_dir / "result.json", result)
