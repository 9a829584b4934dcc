"""One training run: minibatch SGD on the mean loss of each global batch (eq. 1), with the paper's
schedule, from a resolved config, into a self-describing run directory.

    run_dir/config.yaml        resolved config (the science; layout keys may change on resume)
    run_dir/env.json           code version, library versions, host, layout of the latest segment
    run_dir/metrics.jsonl      one JSON record per logged step and per evaluation
    run_dir/tb/                TensorBoard events
    run_dir/checkpoints/       step-XXXXXXXX.pt (last K, for resuming) and final.pt
    run_dir/result.json        status, steps, final train loss, test metric, throughput, layout
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import models
from data_pipelines import ReaderOptions, build_data, examples_per_epoch
from harness import distributed, objectives, provenance
from harness.checkpoint import Checkpointer, rng_state, set_rng_state
from harness.config import Config, check_resumable, to_yaml
from harness.engine import build_engine
from harness.optim import build_optimizer, momentum_of, param_groups, torch_lr
from harness.plan import make_batch_plan, to_steps
from harness.rundir import RunLog, atomic_save_torch, atomic_write_json, atomic_write_text, read_json
from harness.schedule import decay_factor, lr_at
from harness.signals import StopRequest, requeue_slurm_job
from models import ghost_bn

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.float32}  # bf16: fp32 weights, autocast


@dataclass
class TrainState:
    """Everything about progress that a checkpoint must carry besides model and optimizer."""

    step: int = 0
    train_seconds: float = 0.0  # time inside train steps, for examples/s
    wall_seconds: float = 0.0  # wall time of earlier segments of this run
    tail_loss_sum: float = 0.0  # training loss summed over the final window of steps
    tail_steps: int = 0
    segments: list = field(default_factory=list)  # layout of each segment (resumes)


def say(env, text: str) -> None:
    if env.is_main:
        tqdm.write(f"harness: {text}")


def train(cfg: Config, run_dir: str | Path) -> dict:
    """Train (or resume, or skip if finished) one run; return its result record."""
    started = time.time()
    env = distributed.setup(cfg.device)
    try:
        return _train(cfg, Path(run_dir), env, started)
    finally:
        distributed.teardown()


def _train(cfg: Config, run_dir: Path, env, started: float) -> dict:
    done = run_dir / "result.json"
    if done.exists():
        check_resumable(run_dir, cfg)
        result = read_json(done)
        if result.get("status") in ("completed", "diverged"):
            say(env, f"{run_dir} is already finished (status {result['status']}); nothing to do")
            return result
    if env.is_main:
        check_resumable(run_dir, cfg)

    # Everything that can be wrong with the config, layout or data fails here, before the run dir exists.
    dtype = DTYPES[cfg.precision]
    plan = make_batch_plan(cfg.batch.global_batch_size, env.world_size, cfg.batch.micro_batch_size,
                           cfg.batch.max_micro_batch_size, cfg.model.ghost_group_size())
    data = build_data(cfg.data.name, cfg.data.path, cfg.data.augment, cfg.data.eval_batch_size,
                      plan, cfg.seed, env.rank, env.device, dtype, ReaderOptions.of(cfg.data), cfg.model.task,
                      cfg.model.sequence_length())
    d = to_steps(cfg.budget.steps, cfg.budget.epochs,
                 examples_per_epoch(data.spec, plan.global_batch_size, cfg.model.sequence_length()), plan.global_batch_size,
                 cfg.eval.every_steps, cfg.eval.every_epochs, cfg.checkpoint.every_steps, cfg.checkpoint.every_epochs)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and at every layout
    model = models.build_model(cfg.model, data.spec).to(env.device, dtype)
    # Ghost-BN groups that span ranks (m < G) normalize through their ranks' process group (issue 3).
    ghost_bn.set_process_group(model, distributed.ghost_bn_group(plan.ranks_per_ghost_group))
    n_params = models.count_parameters(model)
    m = momentum_of(cfg.optim.name, cfg.optim.momentum)
    groups = param_groups(model, cfg.model.exclude_norm_and_bias_from_decay())
    engine = build_engine(cfg.backend, model, build_optimizer(groups, cfg.optim.name, m, cfg.optim.weight_decay),
                          env, cfg.precision, cfg.optim.grad_clip_norm, plan=plan, deepspeed_config_path=cfg.deepspeed.config)
    objective = objectives.for_task(data.spec.task)
    eps0 = cfg.optim.effective_lr
    gamma = decay_factor(eps0, cfg.schedule.decay_factor, cfg.schedule.final_lr)

    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep, env.is_main)
    state = TrainState()
    loaded = ckpt.load_latest(env.device)
    if loaded is not None:
        payload, path = loaded
        engine.load_state_dict(payload)
        objective.load_state_dict(payload.get("objective", {}))
        set_rng_state(payload["rng"])
        state = TrainState(**payload["state"])
        say(env, f"resumed from {path} (step {state.step} of {d.total_steps})")
    state.segments.append({"world_size": env.world_size, "from_step": state.step, **provenance.slurm_info()})
    if env.is_main:
        atomic_write_json(run_dir / "env.json", provenance.environment(env, plan))

    say(env, f"run dir {run_dir}")
    if "job_id" in state.segments[-1]:
        say(env, f"SLURM job {state.segments[-1]['job_id']}, SLURM_RESTART_COUNT={state.segments[-1].get('restart_count', 0)}")
    say(env, f"plan {plan.describe()}")
    say(env, f"model {cfg.model.name}: {n_params:,} parameters; data {data.spec.kind}: "
             f"{data.spec.num_train} train / {data.spec.num_test} test examples")
    say(env, f"budget {d.total_steps} steps = {d.epochs:.4g} epochs; eps_eff {eps0:g} = lr {torch_lr(eps0, m):g} / (1 - {m:g}); "
             f"T = eps_eff / B = {eps0 / plan.global_batch_size:.4g}; decay x1/{gamma:.4g} ten times from step {d.total_steps // 2}")

    log = RunLog(run_dir, env.is_main, cfg.log.tensorboard, resume_step=state.step)
    stop = StopRequest(run_dir)
    bar = tqdm(total=d.total_steps, initial=state.step, disable=not (env.is_main and cfg.log.progress),
               unit="step", dynamic_ncols=True)
    tail_start = d.total_steps - max(1, d.total_steps // 20)  # the final-rate window defines "final train loss"
    status, diverged_at, last_save = "completed", None, time.time()
    try:
        for step in range(state.step, d.total_steps):
            eff = lr_at(step, d.total_steps, eps0, gamma, cfg.schedule.warmup_steps)
            want_log = (step + 1) % cfg.log.every_steps == 0 or step + 1 == d.total_steps
            t0 = time.perf_counter()
            stats, norms = train_step(engine, objective, data.train_micro_batches(step), plan, torch_lr(eff, m), want_log)
            # Flags every rank must agree on: a stop request (any rank), a time-based checkpoint (rank 0's clock:
            # saving may be collective, e.g. the language model's hidden state is gathered over ranks).
            minutes_due = (env.is_main and cfg.checkpoint.every_minutes is not None
                           and time.time() - last_save >= 60 * cfg.checkpoint.every_minutes)
            stats = distributed.all_reduce_sum(torch.cat([stats, stats.new_tensor([float(stop.requested()), float(minutes_due)])]))
            train_stats = objective.summarize(stats[:-2].cpu())
            state.train_seconds += time.perf_counter() - t0
            state.step = step + 1
            if step >= tail_start:
                state.tail_loss_sum += train_stats["loss"]
                state.tail_steps += 1
            if not math.isfinite(train_stats["loss"]) or (cfg.divergence.max_loss is not None and train_stats["loss"] > cfg.divergence.max_loss):
                status, diverged_at = "diverged", state.step
                say(env, f"training loss {train_stats['loss']:.4g} at step {state.step}: diverged; stopping (exit 0, status diverged)")
                break
            if want_log:
                rate = state.step * plan.global_batch_size / max(state.train_seconds, 1e-9)
                log.write({"step": state.step, "epoch": state.step / (d.total_steps / d.epochs),
                           **{f"train_{k}": v for k, v in train_stats.items()}, "lr": torch_lr(eff, m), "effective_lr": eff,
                           "temperature": eff / plan.global_batch_size, "examples_per_second": rate, **norms})
                bar.set_postfix(loss=f"{train_stats['loss']:.4f}", lr=f"{torch_lr(eff, m):.3g}", ex_s=f"{rate:.0f}", refresh=False)
            bar.update(1)
            if d.eval_every and state.step % d.eval_every == 0 and state.step < d.total_steps:
                log.write({"step": state.step, **evaluate(engine, objective, data)})
            stopping = stats[-2].item() > 0 and state.step < d.total_steps  # a stop at the end is just the end
            due = (d.checkpoint_every and state.step % d.checkpoint_every == 0) or stats[-1].item() > 0
            if (due or stopping) and state.step < d.total_steps:
                save_checkpoint(ckpt, engine, state, started, objective)
                last_save = time.time()
            if stopping:
                status = "interrupted"
                say(env, f"stop requested ({stop.signal_name or 'another rank'}): checkpoint saved at step {state.step}")
                if env.is_main and (note := requeue_slurm_job()):
                    say(env, note)
                break
    finally:
        bar.close()
        stop.restore()

    result = finish(cfg, run_dir, env, engine, objective, data, log, state, plan, d, status, diverged_at, n_params, started)
    log.close()
    return result


def train_step(engine, objective, micro_batches, plan, lr: float, want_norms: bool):
    """One optimizer step: accumulate the gradient of the global-batch mean over A micro-steps, then step."""
    stats = None
    for i, batch in enumerate(micro_batches):
        s = engine.micro_step(objective, batch, plan.global_batch_size, last=i == plan.accumulation_steps - 1)
        stats = s if stats is None else stats + s
    return stats, engine.step(lr, want_norms)


@torch.no_grad()
def evaluate(engine, objective, data) -> dict[str, float]:
    """The test metric over the whole test split (each example once, shared over ranks), BN in eval mode."""
    model = engine.module
    model.eval()
    stats = None
    for batch in data.eval_batches():
        with engine.autocast():
            _, s = objective(model, batch)
        stats = s if stats is None else stats + s
    model.train()
    if stats is None:  # this rank's share is empty (more ranks than test examples)
        stats = torch.zeros(len(objective.stat_names), dtype=torch.float64, device=engine_device(engine))
    return {f"test_{k}": v for k, v in objective.summarize(distributed.all_reduce_sum(stats).cpu()).items()}


def engine_device(engine) -> torch.device:
    return next(engine.module.parameters()).device


def save_checkpoint(ckpt: Checkpointer, engine, state: TrainState, started: float, objective) -> None:
    """Every rank calls this at the same step (the objective's state may be gathered over ranks); rank 0 writes."""
    snapshot = asdict(state)
    snapshot["wall_seconds"] = state.wall_seconds + (time.time() - started)
    ckpt.save(state.step, {**engine.state_dict(), "rng": rng_state(), "state": snapshot,
                           "objective": objective.state_dict()})


def finish(cfg, run_dir, env, engine, objective, data, log, state, plan, d, status, diverged_at, n_params, started) -> dict:
    """Final evaluation, final weights and result.json (completed or diverged); or just report (interrupted)."""
    metrics = {}
    if status == "completed":
        metrics = evaluate(engine, objective, data)
        log.write({"step": state.step, **metrics})
        if env.is_main:
            atomic_save_torch(run_dir / "checkpoints" / "final.pt",
                              {"model": engine.module.state_dict(), "step": state.step, "config": to_yaml(cfg)})
    result = {
        "status": status,
        "steps": state.step,
        "total_steps": d.total_steps,
        "epochs": state.step / (d.total_steps / d.epochs),
        "train_loss": state.tail_loss_sum / state.tail_steps if state.tail_steps else None,
        **objective.train_summary(state.tail_loss_sum / state.tail_steps if state.tail_steps else None),
        "test_metric": objective.metric,
        "higher_is_better": objective.higher_is_better,
        objective.metric: metrics.get(objective.metric),
        **{k: v for k, v in metrics.items() if k != objective.metric},
        "diverged_at_step": diverged_at,
        "examples_per_second": state.step * plan.global_batch_size / max(state.train_seconds, 1e-9),
        "wall_seconds": state.wall_seconds + (time.time() - started),
        "parameters": n_params,
        "layout": plan.as_dict(),
        "segments": state.segments,
    }
    if status == "interrupted":
        return result
    if env.is_main:
        atomic_write_json(run_dir / "result.json", result)
        summary = f"{objective.metric} {result[objective.metric]:.4g}" if result[objective.metric] is not None else status
        say(env, f"done: {status} after {state.step} steps; {summary}; final train loss "
                 f"{result['train_loss'] if result['train_loss'] is None else round(result['train_loss'], 5)}; "
                 f"{result['examples_per_second']:.0f} examples/s; result in {run_dir / 'result.json'}")
    return result
