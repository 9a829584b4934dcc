"""Packed runs: many small runs that differ only in learning rate, seed or optimizer, trained together as
ONE batched model in one process, each into its own ordinary run directory.

Why: a digits MLP step takes microseconds; one process per run pays 2-3 s of start-up, and one tiny model
at a time leaves the cores idle. Stacking R runs' weights on a leading dimension turns R small matrix
products into one batched product (torch.baddbmm) and R optimizer updates into a few vector operations.

What stays the same as `harness.train.trainer.train` for each run (tests/test_packed.py checks it in fp64):
- initial weights: torch.manual_seed(seed) then the model builder, exactly as the trainer;
- data: global batch i is stream positions [iB, (i+1)B) of the run's own order (the reader's `stream` with the
  run's seed), with per-example keyed augmentation, cut into the same micro-batches;
- the loss: each micro-batch's loss sum / B, accumulated (eq. 1); the run's own schedule (recipe.schedule);
- the update of torch.optim.SGD (dampening 0, no Nesterov): g += wd w; buf = m buf + g (buf = g at the
  first step); w -= lr buf, with each run's own lr, m and wd as vectors over the run dimension;
- everything a run records (harness/train/record.py): metrics records, the final-loss window, divergence,
  final.pt and result.json, plus `packed_runs`; metrics.jsonl and tb/ through the same MetricsLog.
What differs: floating-point rounding (batched kernels; fused multiply-adds), last bits in fp64. A packed
run writes no mid-run checkpoints: an interrupted pack starts again from step 0 (packs are small).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from data_pipelines import ReaderOptions, build_data
from harness.core import configlib
from harness.core.errors import ConfigError
from harness.core.io import atomic_write_json, atomic_write_text
from harness.core.keys import flatten
from harness.core.status import COMPLETED, DIVERGED
from harness.recipe.optim import momentum_of, torch_lr
from harness.recipe.schedule import Schedule
from harness.train import distributed, objectives, provenance, record
from harness.train.config import Config, durations_of, plan_of, to_yaml
from harness.train.metrics_log import MetricsLog
from harness.train.trainer import DTYPES

# Keys in which the runs of one pack may differ; everything else must be equal.
PACK_KEYS = ("seed", "optim.name", "optim.momentum", "optim.effective_lr", "optim.weight_decay",
             "schedule.final_lr", "schedule.decay_factor")
# Families whose model is a plain Sequential of Flatten / Linear / ReLU (no batch norm, no dropout).
PACKABLE_MODELS = ("mlp",)


def pack_key(config: dict) -> Optional[str]:
    """Runs with the same key can train as one pack; None: this run trains alone (why: `unpackable_reason`)."""
    if unpackable_reason(config):
        return None
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


class _Streams:
    """Each distinct seed's training stream (the reader's `stream`), produced in chunks of steps (bounded
    memory) and indexed per run."""

    def __init__(self, data, seeds: list[int], batch: int, total_steps: int, budget_elems: int = 1 << 23):
        self.data, self.batch, self.total = data, batch, total_steps
        self.seeds = sorted(set(seeds))
        self.set_runs(seeds)
        per_step = batch * max(1, data.train_x[0].numel())
        self.chunk = max(1, budget_elems // (per_step * len(self.seeds)))
        self.lo = self.hi = 0
        self.x = self.y = None

    def set_runs(self, seeds: list[int]) -> None:
        self.run_index = torch.tensor([self.seeds.index(s) for s in seeds], device=self.data.device)

    def step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.lo <= step < self.hi:
            self.lo, self.hi = step, min(self.total, step + self.chunk)
            parts = [self.data.stream(self.lo * self.batch, self.hi * self.batch, s) for s in self.seeds]
            self.x = torch.stack([p[0] for p in parts]).unflatten(1, (self.hi - self.lo, self.batch))
            self.y = torch.stack([p[1] for p in parts]).unflatten(1, (self.hi - self.lo, self.batch))
        i = step - self.lo
        return self.x[:, i].index_select(0, self.run_index), self.y[:, i].index_select(0, self.run_index)


def train_pack(cfgs: list[Config], run_dirs: list[Path], stop: Optional[Callable[[], bool]] = None,
               on_result: Optional[Callable[[int, dict], None]] = None) -> list[Optional[dict]]:
    """Train runs that share everything but PACK_KEYS as one batched model; return each run's result
    (None for a run left unfinished because `stop()` turned true)."""
    started = time.time()
    keys = {pack_key(configlib.to_dict(c)) for c in cfgs}
    if None in keys or len(keys) != 1:
        raise ConfigError("these runs cannot form one pack: they differ in more than " + ", ".join(PACK_KEYS))
    env = distributed.setup(cfgs[0].device)
    if env.world_size != 1:
        raise ConfigError("packed runs train in one process; run the sweep executor without torchrun")
    results: list[Optional[dict]] = [record.finished_result(Path(d), c) for c, d in zip(cfgs, run_dirs)]
    todo = [i for i, r in enumerate(results) if r is None]
    if not todo:
        return results
    pack = Pack([cfgs[i] for i in todo], [Path(run_dirs[i]) for i in todo], env, started)

    def finished(r: int, result: dict) -> None:
        results[todo[r]] = result
        if on_result:
            on_result(todo[r], result)

    pack.train(stop, finished)
    return results


class Pack:
    """R runs as one batched model: their per-run hyper-parameters as vectors, one shared data reader."""

    def __init__(self, cfgs: list[Config], dirs: list[Path], env, started: float):
        cfg0 = cfgs[0]
        self.cfgs, self.dirs, self.env, self.started = cfgs, dirs, env, started
        self.plan = plan_of(cfg0, 1)
        self.data = build_data(cfg0.data.name, cfg0.data.path, cfg0.data.augment, cfg0.data.eval_batch_size, self.plan,
                               cfg0.seed, 0, env.device, DTYPES[cfg0.precision], ReaderOptions.of(cfg0.data),
                               cfg0.model.task, cfg0.model.sequence_length())
        if self.data.spec.task != "classification" or not hasattr(self.data, "stream"):
            raise NotPackable(f"packed runs need in-memory classification data, not {self.data.spec.task} "
                              f"({type(self.data).__name__})")
        self.durations = durations_of(cfg0, self.data.spec)
        self.objective = objectives.for_task(self.data.spec.task)
        self.net, self.parameters = self._build_net()
        self.moms = [momentum_of(c.optim.name, c.optim.momentum) for c in cfgs]
        self.schedules = [Schedule.of(c.optim.effective_lr, c.schedule.decay_factor, c.schedule.final_lr,
                                      self.durations.total_steps, c.schedule.warmup_steps) for c in cfgs]
        tensors = self.net.tensors()
        self.mom_t = [_per_run(self.moms, p) for p in tensors]
        self.wd_t = [_per_run([c.optim.weight_decay for c in cfgs], p) for p in tensors]
        self.bufs = [torch.zeros_like(p) for p in tensors]
        self.logs = self._start_run_dirs()
        self.streams = _Streams(self.data, [c.seed for c in cfgs], self.plan.global_batch_size, self.durations.total_steps)
        R, dev = len(cfgs), env.device
        self.alive = torch.ones(R, dtype=torch.bool, device=dev)
        self.tail_sum = torch.zeros(R, dtype=torch.float64, device=dev)
        self.tail_n = 0
        self.train_seconds = 0.0
        self.effs: list[float] = []

    def _build_net(self) -> tuple[BatchedSequential, int]:
        states, template = [], None
        for cfg in self.cfgs:
            torch.manual_seed(cfg.seed)  # the trainer's initial weights, run by run
            model = models.build_model(cfg.model, self.data.spec).to(self.env.device, DTYPES[cfg.precision])
            template = template or model
            states.append(model.state_dict())
        return BatchedSequential(template, states), models.count_parameters(template)

    def _start_run_dirs(self) -> list[MetricsLog]:
        logs = []
        environment = {**provenance.environment(self.env, self.plan), "packed_runs": len(self.cfgs)}  # once: it runs git
        for cfg, run_dir in zip(self.cfgs, self.dirs):
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(run_dir / "tb", ignore_errors=True)  # from an interrupted attempt: a pack restarts at step 0
            atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
            atomic_write_json(run_dir / "env.json", environment)
            logs.append(MetricsLog(run_dir, True, cfg.log.tensorboard))
        return logs

    def train(self, stop: Optional[Callable[[], bool]], finished: Callable[[int, dict], None]) -> None:
        """Every step of every run; `finished(r, result)` as each run ends (diverged runs on the way)."""
        S, every = self.durations.total_steps, self.durations.eval_every
        for step in range(S):
            if stop is not None and stop():
                for log in self.logs:
                    log.close()
                return
            losses, correct, norms = self.step(step, (step + 1) % self.cfgs[0].log.every_steps == 0 or step + 1 == S)
            dead = self.account(step, losses, correct, norms)
            for r in dead:
                finished(r, self.finish_run(r, DIVERGED, step + 1, {}, diverged_at=step + 1))
            if not self.alive.any():
                return
            if every and (step + 1) % every == 0 and step + 1 < S:
                for r, ev in self.evaluate().items():
                    self.logs[r].write({"step": step + 1, **ev})
        for r, ev in self.evaluate().items():
            self.logs[r].write({"step": S, **ev})
            finished(r, self.finish_run(r, COMPLETED, S, ev))

    def step(self, step: int, want_norms: bool):
        """One optimizer step of every run: (per-run loss, per-run correct count, per-run norms if wanted)."""
        if not self.effs or any(s.changes_at(step) for s in self.schedules):
            self.effs = [s.at(step) for s in self.schedules]
            lrs = [torch_lr(e, m) for e, m in zip(self.effs, self.moms)]
            self.neg_lr = [-_per_run(lrs, p) * self.alive.view(-1, *([1] * (p.dim() - 1))) for p in self.net.tensors()]
        t0 = time.perf_counter()
        b, R = self.plan.global_batch_size, len(self.cfgs)
        x, y = self.streams.step(step)
        loss_sum = correct = 0
        for a in range(self.plan.accumulation_steps):
            lo, hi = self.plan.micro_slice(a, 0)
            xm, ym = x[:, lo:hi], y[:, lo:hi]
            logits = self.net(xm)
            per_run = F.cross_entropy(logits.flatten(0, 1), ym.flatten(), reduction="none").view(R, -1).sum(1)
            (per_run * (1.0 / b)).sum().backward()  # the trainer's loss_sum * W / B, per run
            loss_sum = loss_sum + per_run.detach().double()
            correct = correct + (logits.detach().argmax(-1) == ym).sum(1).double()
        norms = self._sgd_update(want_norms)
        self.train_seconds += time.perf_counter() - t0
        return loss_sum / b, correct, norms

    @torch.no_grad()
    def _sgd_update(self, want_norms: bool) -> dict:
        tensors = self.net.tensors()
        grads = [p.grad for p in tensors]
        norms = {}
        if want_norms:
            norms["grad_norm"] = _norms(grads)
            before = [p.detach().clone() for p in tensors]
        for p, g, buf, m, wd, nlr in zip(tensors, grads, self.bufs, self.mom_t, self.wd_t, self.neg_lr):
            g.addcmul_(p, wd)  # torch.optim.SGD: grad = grad + weight_decay * param
            buf.mul_(m).add_(g)  # buf = m buf + g; buf starts at 0, so the first step gives buf = g
            p.addcmul_(buf, nlr)  # param = param - lr buf
            p.grad = None
        if want_norms:
            norms["param_norm"] = _norms(tensors)
            norms["update_norm"] = _norms([p - q for p, q in zip(tensors, before)])
        return norms

    def account(self, step: int, losses: torch.Tensor, correct: torch.Tensor, norms: dict) -> list[int]:
        """The final-loss window, divergence and the metrics records after a step; returns the runs that diverged."""
        b = self.plan.global_batch_size
        if step >= self.durations.final_window_start:
            self.tail_sum += torch.where(self.alive, losses, 0.0)
            self.tail_n += 1
        dead = (record.diverged(losses, self.cfgs[0].divergence.max_loss) & self.alive).nonzero().flatten().tolist()
        if dead:
            self.alive[dead] = False
        if norms:
            rate = (step + 1) * b / max(self.train_seconds, 1e-9)
            lv, av = losses.tolist(), (100.0 * correct / b).tolist()
            nv = {k: v.tolist() for k, v in norms.items()}
            for r in self.alive.nonzero().flatten().tolist():
                eff = self.effs[r]
                self.logs[r].write(record.progress_record(step + 1, self.durations, {"loss": lv[r], "accuracy": av[r]},
                                                          torch_lr(eff, self.moms[r]), eff, b, rate,
                                                          {k: v[r] for k, v in nv.items()}))
        if dead:
            with torch.no_grad():  # keep NaNs out of the batched arithmetic: these runs are over
                for p, buf, nlr in zip(self.net.tensors(), self.bufs, self.neg_lr):
                    p[dead] = 0.0
                    buf[dead] = 0.0
                    nlr[dead] = 0.0
        return dead

    @torch.no_grad()
    def evaluate(self) -> dict[int, dict[str, float]]:
        """Every live run's test metrics over the whole test split, in the trainer's eval batches."""
        R = len(self.cfgs)
        loss_sum = torch.zeros(R, dtype=torch.float64, device=self.data.device)
        correct = torch.zeros(R, dtype=torch.float64, device=self.data.device)
        count = 0
        for x, y in self.data.eval_batches():
            logits = self.net(x.unsqueeze(0).expand(R, *x.shape))
            loss_sum += F.cross_entropy(logits.flatten(0, 1), y.repeat(R), reduction="none").view(R, -1).sum(1).double()
            correct += (logits.argmax(-1) == y).sum(1).double()
            count += len(y)
        out = {}
        for r in self.alive.nonzero().flatten().tolist():
            stats = torch.tensor([loss_sum[r].item(), float(count), correct[r].item()], dtype=torch.float64)
            out[r] = {f"test_{k}": v for k, v in self.objective.summarize(stats).items()}
        return out

    def finish_run(self, r: int, status: str, steps: int, metrics: dict, diverged_at: int | None = None) -> dict:
        """Run r's result.json (and final.pt when it completed), in the trainer's format plus `packed_runs`."""
        b = self.plan.global_batch_size
        train_loss = self.tail_sum[r].item() / self.tail_n if self.tail_n else None
        result = record.result_record(status, steps, self.durations, train_loss, self.objective, metrics, diverged_at,
                                      steps * b / max(self.train_seconds, 1e-9), time.time() - self.started,
                                      self.parameters, self.plan, [record.segment(1, 0)], packed_runs=len(self.cfgs))
        if status == COMPLETED:
            record.write_final(self.dirs[r], self.net.state_dict(r), steps, self.cfgs[r])
        self.logs[r].close()
        record.write_result(self.dirs[r], result)
        return result
