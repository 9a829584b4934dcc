"""Packed runs: runs that differ only in learning rate, seed, weight decay or optimizer (same model, data, B and
budget) trained together as ONE batched model on one device (packed_model.py: torch.func.vmap over stacked
parameters), each into its own ordinary run directory.

Why: a small run cannot fill a device. The paper's small-batch cells (B <= 512 in figs. 1, 5, 6 and table 3) are
Wide-ResNet runs that leave an H200 mostly idle one at a time, and a digits MLP step takes microseconds. Packing
turns R small models into one wide one (grouped convolutions, batched products) and R optimizer updates into a
few vector operations.

What stays the same as `harness.train.trainer.train` for each run (tests/test_packed.py checks every family in
fp64 against separate runs, within 1e-10):
- initial weights: torch.manual_seed(seed) then the model builder, exactly as the trainer;
- data: global batch i is stream positions [iB, (i+1)B) of the run's own order (the reader's `stream` with the
  run's seed), with its per-example augmentation and dropout keys, cut into the same micro-batches;
- the loss: each micro-batch's loss sum / B, accumulated (eq. 1); ghost-BN groups and running statistics per run;
  the run's own schedule (recipe.schedule);
- the update of torch.optim.SGD (dampening 0, no Nesterov): g += wd w; buf = m buf + g (buf = g at the first
  step); w -= lr buf, with each run's own lr, m and wd (0 on normalization parameters where the model says so);
- everything a run records (record.py: metrics records, the final-loss window, divergence through the same
  Ledger, final.pt, result.json plus `packed_runs`), its metrics.jsonl and tb/, and checkpoints in the trainer's
  format, so an interrupted pack resumes (packed or run by run) from its last checkpoint.
What differs: floating-point rounding (batched kernels), the last bits in fp64. Not packed: the LSTM (torch's
LSTM kernel has no vmap batching rule, and its carried hidden state is per run), gradient clipping, bf16,
DeepSpeed, the noise scale and torch.compile: such runs train one by one.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch

import models
from data_pipelines import ReaderOptions, build_data
from harness.core import configlib
from harness.core.errors import ConfigError
from harness.core.io import atomic_write_json, atomic_write_text
from harness.core.keys import flatten
from harness.core.lockfile import RunDirLock
from harness.core.status import COMPLETED, DIVERGED
from harness.recipe.optim import build_optimizer, momentum_of, param_groups, torch_lr
from harness.recipe.schedule import Schedule
from harness.train import distributed, numerics, objectives, provenance, record
from harness.train.checkpoint import Checkpointer, check_payload, none_usable, read, rng_state, step_of, warn_unusable
from harness.train.config import Config, durations_of, plan_of, to_yaml
from harness.train.metrics_log import MetricsLog
from harness.train.packed_model import PackedModel
from harness.train.record import Ledger, TrainState
from harness.train.trainer import DTYPES

# Keys in which the runs of one pack may differ; everything else must be equal.
PACK_KEYS = ("seed", "optim.name", "optim.momentum", "optim.effective_lr", "optim.weight_decay",
             "schedule.final_lr", "schedule.decay_factor")
PACKABLE_MODELS = ("mlp", "wrn", "resnet", "autoencoder", "convnet")


def pack_key(config: dict) -> Optional[str]:
    """Runs with the same key can train as one pack; None: this run trains alone (why: `unpackable_reason`)."""
    if unpackable_reason(config):
        return None
    rest = {k: v for k, v in flatten(config).items() if k not in PACK_KEYS}
    return json.dumps(rest, sort_keys=True)


# Families whose packs train slower than the same runs one by one on a CPU. vmap turns a pack's R 2-D convolutions
# into one grouped convolution, which torch's CPU kernels run slower than R plain ones, while R linear layers become
# one batched product that they run much faster, and so do the small 1-D convolutions of the demo's convnet
# (benchmarks/packed.py on quiet cores of a 2-core CPU: WRN-10-1 0.35x, the demo convnet 1.96x, the digits MLP 3.56x
# or more; docs/cpu_speed.md). The ResNet is a 2-D conv net too. On CUDA every packable family packs.
CPU_UNPACKED_MODELS = ("wrn", "resnet")


def run_device(config: dict, cuda_available: bool) -> str:
    """The device type a run trains on: its `device`, where auto is CUDA when there is one (distributed.setup)."""
    device = config.get("device", "auto")
    return ("cuda" if cuda_available else "cpu") if device == "auto" else device


def pack_choice(config: dict, pack: Optional[bool], cuda_available: bool) -> tuple[bool, str]:
    """Whether the sweep executor trains this run in a pack, and why. `pack`: True (--pack, spec executor.pack: true)
    packs every packable run, False (--no-pack) none, None (the default) decides by family and device."""
    why = unpackable_reason(config)
    if why:
        return False, why
    if pack is not None:
        return pack, "--pack" if pack else "--no-pack"
    model, device = config["model"]["name"], run_device(config, cuda_available)
    if device == "cpu" and model in CPU_UNPACKED_MODELS:
        return False, "packed 2-D conv nets train slower than one by one on cpu (--pack packs them anyway)"
    if device == "cpu":
        kind = "1-D conv net" if model == "convnet" else "fully connected"
        return True, f"{kind} packs train faster than one by one on cpu"
    return True, f"every packable family packs on {device}"


def unpackable_reason(config: dict) -> str:
    if config["model"]["name"] not in PACKABLE_MODELS:
        return f"model {config['model']['name']} is not packable (only {', '.join(PACKABLE_MODELS)})"
    if config["data"]["name"] in ("ptb", "imagenet"):
        return f"data {config['data']['name']} is not held in memory"
    if config["optim"].get("grad_clip_norm") is not None:
        return "gradient clipping"
    if config["precision"] not in ("fp32", "fp64") or config["backend"] != "ddp":
        return "precision bf16/tf32 or backend deepspeed"
    if config.get("log", {}).get("noise_scale") or config.get("speed", {}).get("compile"):
        return "log.noise_scale or speed.compile"
    return ""


class NotPackable(ConfigError):
    """These runs cannot train as one batched model: they train one by one instead."""


def train_pack(cfgs: list[Config], run_dirs: list[Path], stop: Optional[Callable[[], bool]] = None,
               on_result: Optional[Callable[[int, dict], None]] = None) -> list[Optional[dict]]:
    """Train runs that share everything but PACK_KEYS as one batched model; return each run's result
    (None for a run left unfinished because `stop()` turned true: it checkpointed)."""
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

    def finished(r: int, result: dict) -> None:
        results[todo[r]] = result
        if on_result:
            on_result(todo[r], result)

    locks = [RunDirLock(Path(run_dirs[i])) for i in todo]  # one writer per run dir, as for `harness train`
    try:
        for lock in locks:
            lock.acquire()
        Pack([cfgs[i] for i in todo], [Path(run_dirs[i]) for i in todo], env, started).train(stop, finished)
    finally:
        for lock in locks:
            lock.release()
    return results


def _per_run(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """A (R, 1, 1, ...) tensor broadcasting against a stacked parameter, written on the device (torch.full per
    value, as objectives._stats does): torch.tensor(values, device=cuda) is a blocking host-to-device copy, which
    waits for the GPU, and the learning rates change every warm-up step (found by tests/test_fake_cuda_packed.py)."""
    column = [torch.full((1,), float(v), dtype=like.dtype, device=like.device) for v in values]
    return torch.cat(column).view(-1, *([1] * (like.dim() - 1)))


def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-run L2 norm over all tensors (R,), in float64."""
    return sum(t.detach().double().pow(2).reshape(len(t), -1).sum(1) for t in tensors).sqrt()


class _Streams:
    """Each distinct seed's training stream (the reader's `stream`: inputs, targets, keys), produced in chunks of
    steps (bounded memory) and indexed per run."""

    def __init__(self, data, seeds: list[int], batch: int, total_steps: int, budget_elems: int = 1 << 23):
        self.data, self.batch, self.total = data, batch, total_steps
        self.seeds = sorted(set(seeds))
        self.run_index = torch.tensor([self.seeds.index(s) for s in seeds], device=data.device)
        self.chunk = max(1, budget_elems // (batch * max(1, data.train_x[0].numel()) * len(self.seeds)))
        self.lo = self.hi = 0
        self.parts = None

    def step(self, step: int) -> tuple[torch.Tensor, ...]:
        if not self.lo <= step < self.hi:
            self.lo, self.hi = step, min(self.total, step + self.chunk)
            streams = [self.data.stream(self.lo * self.batch, self.hi * self.batch, s) for s in self.seeds]
            self.parts = [torch.stack(p).unflatten(1, (self.hi - self.lo, self.batch)) for p in zip(*streams)]
        i = step - self.lo
        return tuple(p[:, i].index_select(0, self.run_index) for p in self.parts)


class Pack:
    """R runs as one batched model: their per-run hyper-parameters as vectors, one shared data reader."""

    def __init__(self, cfgs: list[Config], dirs: list[Path], env, started: float):
        cfg0 = cfgs[0]
        self.cfgs, self.dirs, self.env, self.started = cfgs, dirs, env, started
        self.numerics = numerics.configure(cfg0.precision, cfg0.speed.deterministic, env.device)
        self.plan = plan_of(cfg0, 1)
        self.data = build_data(cfg0.data.name, cfg0.data.path, cfg0.data.augment, cfg0.data.eval_batch_size, self.plan,
                               cfg0.seed, 0, env.device, DTYPES[cfg0.precision], ReaderOptions.of(cfg0.data),
                               cfg0.model.task, cfg0.model.sequence_length())
        if not hasattr(self.data, "stream"):
            raise NotPackable(f"packed runs need in-memory data, not {type(self.data).__name__}")
        self.durations = durations_of(cfg0, self.data.spec)
        self.objective = objectives.for_task(self.data.spec.task)
        self.net, self.parameters = self._build_net()
        self.moms = [momentum_of(c.optim.name, c.optim.momentum) for c in cfgs]
        self.schedules = [Schedule.of(c.optim.effective_lr, c.schedule.decay_factor, c.schedule.final_lr,
                                      self.durations.total_steps, c.schedule.warmup_steps) for c in cfgs]
        self.exclude_norm = cfg0.model.exclude_norm_from_decay()
        self.bufs = {n: torch.zeros_like(p) for n, p in self.net.params.items()}
        self.mom_t = {n: _per_run(self.moms, p) for n, p in self.net.params.items()}
        self.wd_t = {n: _per_run([0.0 if self.exclude_norm and n in self.net.norm_names else c.optim.weight_decay
                                  for c in cfgs], p) for n, p in self.net.params.items()}
        self.states = [TrainState() for _ in cfgs]
        self.checkpoints = [Checkpointer(d / "checkpoints", c.checkpoint.keep, True) for c, d in zip(cfgs, dirs)]
        self.step0 = self._resume()
        for s in self.states:
            s.segments.append(record.segment(1, self.step0))
        self.logs = self._start_run_dirs()
        self.streams = _Streams(self.data, [c.seed for c in cfgs], self.plan.global_batch_size, self.durations.total_steps)
        dev = env.device
        self.alive = torch.ones(len(cfgs), dtype=torch.bool, device=dev)  # for the batched arithmetic
        self.live = [True] * len(cfgs)  # the same on the host, where read_back retires runs
        self.ledger = Ledger(self.durations.final_window_start, cfg0.divergence.max_loss,
                             torch.zeros(len(cfgs), dtype=torch.float64, device=dev))
        self.ledger.tail_sum = torch.tensor([s.tail_loss_sum for s in self.states], dtype=torch.float64, device=dev)
        self.ledger.tail_steps = torch.tensor([s.tail_steps for s in self.states], dtype=torch.int64, device=dev)
        self.train_seconds = max(s.train_seconds for s in self.states)
        self.effs: list[float] = []

    def _build_net(self) -> tuple[PackedModel, int]:
        nets = []
        for cfg in self.cfgs:
            torch.manual_seed(cfg.seed)  # the trainer's initial weights, run by run
            nets.append(models.build_model(cfg.model, self.data.spec).to(self.env.device, DTYPES[cfg.precision]))
        try:
            return PackedModel(nets), models.count_parameters(nets[0])
        except (RuntimeError, ValueError) as e:
            raise NotPackable(f"model {self.cfgs[0].model.name} cannot be stacked ({e})") from None

    def _resume(self) -> int:
        """Resume every run from its checkpoint at the latest step all of them have (0: none in common). As in the
        trainer (checkpoint.py), a step where any run's checkpoint is unusable is skipped with a warning, and exit 6
        when every common step is. The pack holds its runs (the sweep task's run locks): stray temps go first."""
        for ck in self.checkpoints:
            ck.remove_stray_temps()
        steps = [{step_of(p): p for p in ck.paths()} for ck in self.checkpoints]
        common = sorted(set.intersection(*(set(s) for s in steps)), reverse=True)
        failed = []
        for i, step in enumerate(common):
            path = None
            try:
                for r, s in enumerate(steps):
                    path = s[step]
                    self._restore(r, read(path), path)
            except Exception as e:  # noqa: BLE001 - unreadable or unfitting: try an older common step
                warn_unusable(path, e, older=i + 1 < len(common))
                failed.append(path)
                continue
            print(f"harness: pack of {len(self.cfgs)} runs resumed from step {step}")
            return step
        if failed:
            raise none_usable(failed)
        return 0

    def _restore(self, r: int, payload: dict, path: Path) -> None:
        """Run r from its checkpoint, checked first against the run's model and torch optimizer (built on the
        template, as the trainer would build them). A failed step leaves nothing behind: every run is loaded
        whole again from the older step."""
        cfg = self.cfgs[r]
        optimizer = build_optimizer(param_groups(self.net.template, self.exclude_norm), cfg.optim.name, self.moms[r],
                                    cfg.optim.weight_decay)
        state = check_payload(payload, self.net.template, optimizer, path)
        self.net.load_state_dict(r, payload["model"])
        self.net.load_optimizer_state(r, payload["optimizer"], self.bufs, cfg.optim.name, self.moms[r],
                                      cfg.optim.weight_decay, self.exclude_norm)
        self.states[r] = state

    def _start_run_dirs(self) -> list[MetricsLog]:
        logs = []
        environment = {**provenance.environment(self.env, self.plan), "packed_runs": len(self.cfgs),  # once: it runs git
                       "numerics": self.numerics}
        for cfg, run_dir in zip(self.cfgs, self.dirs):
            run_dir.mkdir(parents=True, exist_ok=True)
            if self.step0 == 0:  # an attempt that left no common checkpoint: its TensorBoard events go
                shutil.rmtree(run_dir / "tb", ignore_errors=True)
            atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
            atomic_write_json(run_dir / "env.json", environment)
            logs.append(MetricsLog(run_dir, True, cfg.log.tensorboard, resume_step=self.step0))
        return logs

    def train(self, stop: Optional[Callable[[], bool]], finished: Callable[[int, dict], None]) -> None:
        """Every step of every run; `finished(r, result)` as each run ends (diverged runs on the way)."""
        cfg0, S = self.cfgs[0], self.durations.total_steps
        every, ck_every = self.durations.eval_every, self.durations.checkpoint_every
        last_save = time.time()
        for step in range(self.step0, S):
            if stop is not None and stop():
                if step > self.step0:
                    self.save_checkpoints(step)
                for log in self.logs:
                    log.close()
                return
            want_log = (step + 1) % cfg0.log.every_steps == 0 or step + 1 == S
            t0 = time.perf_counter()
            stats, norms = self.step(step, want_log)
            self.ledger.add(step, self.objective.loss(stats))
            eval_due = bool(every) and (step + 1) % every == 0 and step + 1 < S
            ck_due = step + 1 < S and ((bool(ck_every) and (step + 1) % ck_every == 0) or (
                cfg0.checkpoint.every_minutes is not None and time.time() - last_save >= 60 * cfg0.checkpoint.every_minutes))
            if want_log or eval_due or ck_due:
                if not self.read_back(step + 1, stats, norms, want_log, finished):
                    return  # every run diverged
            self.train_seconds += time.perf_counter() - t0
            if eval_due:
                for r, ev in self.evaluate().items():
                    self.logs[r].write({"step": step + 1, **ev})
            if ck_due:
                self.save_checkpoints(step + 1)
                last_save = time.time()
        metrics = self.evaluate()
        if cfg0.eval.train_loss:
            for r, ev in self.evaluate("train").items():
                metrics[r].update({f"train_set_{k[len('train_'):]}": v for k, v in ev.items()})
        for r, ev in metrics.items():
            self.logs[r].write({"step": S, **ev})
            finished(r, self.finish_run(r, COMPLETED, S, ev))

    def step(self, step: int, want_norms: bool) -> tuple[torch.Tensor, dict]:
        """One optimizer step of every run: (per-run summed stats (R, k), per-run norms if wanted)."""
        if not self.effs or any(s.changes_at(step) for s in self.schedules):
            self.effs = [s.at(step) for s in self.schedules]
            lrs = [torch_lr(e, m) for e, m in zip(self.effs, self.moms)]
            neg_lr = -_per_run(lrs, next(iter(self.net.params.values()))).flatten() * self.alive  # once, not per tensor
            self.neg_lr = {n: neg_lr.view(-1, *([1] * (p.dim() - 1))) for n, p in self.net.params.items()}
        b = self.plan.global_batch_size
        batch = self.streams.step(step)
        stats = None
        for a in range(self.plan.accumulation_steps):
            lo, hi = self.plan.micro_slice(a, 0)
            loss_sum, s = self.net(self.objective, tuple(t[:, lo:hi] for t in batch))
            (loss_sum * (1.0 / b)).sum().backward()  # the trainer's loss_sum * W / B, per run
            stats = s.detach() if stats is None else stats + s.detach()
        self.net.fold_running_stats()
        return stats, self._sgd_update(want_norms)

    @torch.no_grad()
    def _sgd_update(self, want_norms: bool) -> dict:
        params = self.net.params
        norms = {}
        if want_norms:
            norms["grad_norm"] = _norms([p.grad for p in params.values()])
            before = {n: p.detach().clone() for n, p in params.items()}
        for n, p in params.items():
            g = p.grad
            g.addcmul_(p, self.wd_t[n])  # torch.optim.SGD: grad = grad + weight_decay * param
            self.bufs[n].mul_(self.mom_t[n]).add_(g)  # buf = m buf + g; buf starts at 0, so the first step gives g
            p.addcmul_(self.bufs[n], self.neg_lr[n])  # param = param - lr buf
            p.grad = None
        if want_norms:
            norms["param_norm"] = _norms(list(params.values()))
            norms["update_norm"] = _norms([p - before[n] for n, p in params.items()])
        return norms

    def read_back(self, steps: int, stats: torch.Tensor, norms: dict, want_log: bool, finished) -> bool:
        """One copy to the host: retire the runs that diverged, write the live runs' metrics records. Returns
        whether any run is still alive (known on the host: reading `alive` back would be another wait for the GPU)."""
        flat = torch.cat([self.ledger.snapshot().T, stats.double(), *(v[:, None] for v in norms.values())], 1)
        for r, row in enumerate(flat.cpu().tolist()):
            first, tail_sum, tail_steps = Ledger.unpack(*row[:3])
            self.states[r].tail_loss_sum, self.states[r].tail_steps = tail_sum, tail_steps
            if not self.live[r]:
                continue
            if first is not None:
                self.retire(r)
                finished(r, self.finish_run(r, DIVERGED, first, {}, diverged_at=first))
            elif want_log:
                eff = self.effs[r]
                train_stats = self.objective.summarize(torch.tensor(row[3:3 + stats.shape[1]], dtype=torch.float64))
                self.logs[r].write(record.progress_record(steps, self.durations, train_stats, torch_lr(eff, self.moms[r]),
                                                          eff, self.plan.global_batch_size, self.rate(steps),
                                                          dict(zip(norms, row[3 + stats.shape[1]:]))))
        return any(self.live)

    def live_runs(self) -> list[int]:
        return [r for r, live in enumerate(self.live) if live]

    @torch.no_grad()
    def retire(self, r: int) -> None:
        """Keep a diverged run's NaNs out of the batched arithmetic: its slice is zeroed and its rate set to 0."""
        self.alive[r] = False
        self.live[r] = False
        for n, p in self.net.params.items():
            p[r] = 0.0
            self.bufs[n][r] = 0.0
            self.neg_lr[n][r] = 0.0

    def rate(self, steps: int) -> float:
        return steps * self.plan.global_batch_size / max(self.train_seconds, 1e-9)

    @torch.no_grad()
    def evaluate(self, split: str = "test") -> dict[int, dict[str, float]]:
        """Every live run's metrics over the whole test split (or the training set), in the trainer's batches."""
        self.net.train(False)
        total = None
        for batch in self.data.eval_batches(split) if split != "test" else self.data.eval_batches():
            _, stats = self.net(self.objective, batch, shared=True)
            total = stats if total is None else total + stats
        self.net.train(True)
        rows = total.tolist()
        return {r: {f"{split}_{k}": v for k, v in self.objective.summarize(torch.tensor(rows[r], dtype=torch.float64)).items()}
                for r in self.live_runs()}

    def save_checkpoints(self, step: int) -> None:
        """Each live run's checkpoint in the trainer's format, at the same step."""
        for r in self.live_runs():
            cfg, state = self.cfgs[r], self.states[r]
            state.step, state.train_seconds = step, self.train_seconds
            snapshot = {**asdict(state), "wall_seconds": state.wall_seconds + time.time() - self.started}
            optimizer = self.net.optimizer_state(r, self.bufs, cfg.optim.name, self.moms[r], cfg.optim.weight_decay,
                                                 self.exclude_norm)
            self.checkpoints[r].save(step, {"model": self.net.state_dict(r), "optimizer": optimizer, "rng": rng_state(),
                                            "state": snapshot, "objective": {}})

    def finish_run(self, r: int, status: str, steps: int, metrics: dict, diverged_at: int | None = None) -> dict:
        """Run r's result.json (and final.pt when it completed), in the trainer's format plus `packed_runs`."""
        state = self.states[r]
        result = record.result_record(status, steps, self.durations, state.final_train_loss, self.objective, metrics,
                                      diverged_at, self.rate(steps), state.wall_seconds + time.time() - self.started,
                                      self.parameters, self.plan, state.segments, packed_runs=len(self.cfgs))
        if status == COMPLETED:
            record.write_final(self.dirs[r], self.net.state_dict(r), steps, self.cfgs[r])
        self.logs[r].close()
        record.write_result(self.dirs[r], result)
        return result
