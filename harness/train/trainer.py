"""One training run: minibatch SGD on the mean loss of each global batch (eq. 1), with the paper's
schedule, from a resolved config, into a self-describing run directory.

    run_dir/config.yaml        resolved config (the science; layout keys may change on resume)
    run_dir/env.json           code version, library versions, host, layout and numerics of the latest segment
    run_dir/metrics.jsonl      one JSON record per logged step and per evaluation
    run_dir/tb/                TensorBoard events
    run_dir/checkpoints/       step-XXXXXXXX.pt (last K, for resuming) and final.pt
    run_dir/result.json        status, steps, final train loss, test metric, throughput, layout

`train` reads as the algorithm: `prepare` builds the run (plan, data, model, engine, checkpoint), `loop` takes
the optimizer steps, `finish` evaluates and writes the result. What a run records is defined in record.py.

The steady state of a step never waits for the device: the step's statistics, the divergence check and the
final-loss window stay on the device (record.Ledger) and are read at log intervals (and before an evaluation
or a checkpoint); the flags that every rank must agree on travel on the host (distributed.StepFlags).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import models
from data_pipelines import ReaderOptions, build_data
from harness.core.errors import Interrupted, PeerLost, RunDirInUse
from harness.core.io import atomic_write_json, atomic_write_text
from harness.core.lockfile import RunDirLock
from harness.core.status import COMPLETED, DIVERGED, INTERRUPTED
from harness.recipe.batch_plan import BatchPlan, make_batch_plan
from harness.recipe.budget import Durations
from harness.recipe.optim import build_optimizer, momentum_of, param_groups, torch_lr
from harness.recipe.schedule import Schedule
from harness.train import distributed, numerics, objectives, provenance, record
from harness.train.checkpoint import Checkpointer, check_payload, rng_state, set_rng_state
from harness.train.config import Config, durations_of, plan_of, to_yaml
from harness.train.engine import DDPEngine, EngineBase
from harness.train.metrics_log import MetricsLog
from harness.train.record import Ledger, TrainState
from harness.train.signals import StallWatch, StopRequest, requeue_slurm_job
from models import ghost_bn

# bf16 and tf32: fp32 weights (autocast, or TF32 products).
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.float32, "tf32": torch.float32}


def say(env, text: str) -> None:
    if env.is_main:
        tqdm.write(f"harness: {text}")


@dataclass
class Run:
    """What one run's loop uses, built once by `prepare`."""

    cfg: Config
    run_dir: Path
    env: distributed.DistEnv
    plan: BatchPlan
    data: object  # a reader (data_pipelines.build_data)
    durations: Durations
    engine: EngineBase  # DDPEngine or DeepSpeedEngine
    objective: objectives.Objective
    schedule: Schedule
    momentum: float
    parameters: int
    checkpoints: Checkpointer
    state: TrainState
    started: float
    numerics: dict


def train(cfg: Config, run_dir: str | Path) -> dict:
    """Train (or resume, or skip if finished) one run; return its result record. Ctrl-C: Interrupted (exit 130)
    after the checkpoint; another writer on the run dir: RunDirInUse (exit 9), before anything is written."""
    started = time.time()
    env = distributed.setup(cfg.device, cfg.distributed.startup_timeout_minutes)
    lock = RunDirLock(Path(run_dir))
    try:
        done = record.finished_result(Path(run_dir), cfg)
        if done is not None:
            say(env, f"{run_dir} is already finished (status {done['status']}); nothing to do")
            return done
        run = prepare(cfg, Path(run_dir), env, started, lock)
        announce(run)
        log = MetricsLog(run.run_dir, env.is_main, cfg.log.tensorboard, resume_step=run.state.step)
        try:
            status, diverged_at = loop(run, log)
            return finish(run, log, status, diverged_at)
        finally:
            log.close()
    finally:
        lock.release()
        distributed.teardown()


def prepare(cfg: Config, run_dir: Path, env, started: float, lock: RunDirLock) -> Run:
    """Everything that can be wrong with the config, layout or data fails here, before the run dir exists."""
    math_mode = numerics.configure(cfg.precision, cfg.speed.deterministic, env.device)
    dtype = DTYPES[cfg.precision]
    plan = noise_scale_plan(cfg, plan_of(cfg, env.world_size), env)
    data = build_data(cfg.data.name, cfg.data.path, cfg.data.augment, cfg.data.eval_batch_size,
                      plan, cfg.seed, env.rank, env.device, dtype, ReaderOptions.of(cfg.data), cfg.model.task,
                      cfg.model.sequence_length())
    durations = durations_of(cfg, data.spec)
    hold_run_dir(lock, env)
    if env.is_main:
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and at every layout
    model = models.build_model(cfg.model, data.spec).to(env.device, dtype)
    if channels_last(cfg, model, env.device):
        model = model.to(memory_format=torch.channels_last)
    # Ghost-BN groups that span ranks (m < G) normalize through their ranks' process group.
    ghost_bn.set_process_group(model, distributed.ghost_bn_group(plan.ranks_per_ghost_group))
    m = momentum_of(cfg.optim.name, cfg.optim.momentum)
    optimizer = build_optimizer(param_groups(model, cfg.model.exclude_norm_from_decay()), cfg.optim.name, m,
                                cfg.optim.weight_decay, fused=cfg.speed.fused_optimizer)
    engine = build_engine(cfg, model, optimizer, env, plan)
    objective = objectives.for_task(data.spec.task)
    schedule = Schedule.of(cfg.optim.effective_lr, cfg.schedule.decay_factor, cfg.schedule.final_lr, durations.total_steps,
                           cfg.schedule.warmup_steps)
    run = Run(cfg, run_dir, env, plan, data, durations, engine, objective, schedule, m, models.count_parameters(model),
              Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep, env.is_main), TrainState(), started,
              {**math_mode, "channels_last": channels_last(cfg, model, env.device), "compile": cfg.speed.compile})
    resume(run)
    run.state.segments.append(record.segment(env.world_size, run.state.step))
    if env.is_main:
        atomic_write_json(run_dir / "env.json", {**provenance.environment(env, plan), "numerics": run.numerics})
    return run


def hold_run_dir(lock: RunDirLock, env) -> None:
    """Rank 0 takes the run dir's lock (creating the dir); every rank learns whether it did, so a second job's
    ranks all stop here (RunDirInUse, exit 9) before any of them writes or trains. One lock per job, not per rank:
    rank 0 writes everything a run dir holds (harness/train/record.py, checkpoint.py)."""
    failure = None
    if env.is_main:
        try:
            lock.acquire()
        except Exception as e:  # noqa: BLE001 - told to the other ranks first, then raised as it is
            failure = e
    refused = distributed.broadcast_object(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if refused is not None:  # rank 0 raises the error itself (and the CLI prints it once)
        raise RunDirInUse(refused)


def noise_scale_plan(cfg: Config, plan: BatchPlan, env) -> BatchPlan:
    """The gradient noise scale needs a batch smaller than B before a reduction: at world size 1 without
    accumulation, split the batch into two micro-steps (a layout change: the trajectory is the same)."""
    if not cfg.log.noise_scale or plan.world_size > 1 or plan.accumulation_steps > 1:
        return plan
    half = plan.global_batch_size // 2
    g = plan.ghost_batch_size
    if plan.global_batch_size % 2 or (g is not None and half % g):
        say(env, f"log.noise_scale: B = {plan.global_batch_size} cannot be split into two micro-steps of whole "
                 "ghost-BN groups at world size 1; the noise scale is not measured")
        return plan
    return make_batch_plan(plan.global_batch_size, 1, half, None, g)


def channels_last(cfg: Config, model: torch.nn.Module, device: torch.device) -> bool:
    """speed.channels_last, or by default: on CUDA, for models with 2-D convolutions."""
    if cfg.speed.channels_last is not None:
        return cfg.speed.channels_last
    return device.type == "cuda" and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def build_engine(cfg: Config, model, optimizer, env, plan: BatchPlan) -> EngineBase:
    """The engine that turns micro-batches into optimizer steps: DDP (or one plain process), or DeepSpeed."""
    if cfg.backend == "deepspeed":
        from harness.train.deepspeed_engine import DeepSpeedEngine

        engine = DeepSpeedEngine(model, optimizer, plan, env.device, cfg.precision, cfg.optim.grad_clip_norm,
                                 cfg.deepspeed.config)
    else:
        engine = DDPEngine(model, optimizer, plan, env.device, cfg.precision, cfg.optim.grad_clip_norm)
    if cfg.log.noise_scale and not engine.enable_noise_scale(cfg.log.noise_scale_decay):
        say(env, f"log.noise_scale: {plan.describe()} has no batch smaller than B before a reduction "
                 "(DeepSpeed needs 2+ micro-steps); the noise scale is not measured")
    if cfg.speed.compile:
        engine.compile()
    return engine


def resume(run: Run) -> None:
    """Continue from the newest usable checkpoint, if there is one (checkpoint.py: an unreadable or unfitting one
    is skipped; none usable is exit 6). Rank 0 first removes the temp files of saves killed half-way: this process
    holds the run (`harness train` locks the run directory; a sweep task holds the run's lock)."""
    run.checkpoints.remove_stray_temps()

    def restore(payload: dict, path: Path) -> None:
        state = check_payload(payload, run.engine.module, run.engine.optimizer, path)  # before anything is applied
        run.engine.load_state_dict(payload)
        run.objective.load_state_dict(payload.get("objective", {}))
        set_rng_state(payload["rng"])
        run.state = state

    loaded = run.checkpoints.load_latest(restore)
    if loaded is not None:
        say(run.env, f"resumed from {loaded[1]} (step {run.state.step} of {run.durations.total_steps})")


def announce(run: Run) -> None:
    """The derived quantities, as arithmetic, at start-up."""
    env, cfg, plan, durations, s = run.env, run.cfg, run.plan, run.durations, run.schedule
    say(env, f"run dir {run.run_dir}")
    seg = run.state.segments[-1]
    if "job_id" in seg:
        say(env, f"SLURM job {seg['job_id']}, SLURM_RESTART_COUNT={seg.get('restart_count', 0)}")
    say(env, f"plan {plan.describe()}")
    say(env, f"model {cfg.model.name}: {run.parameters:,} parameters; data {run.data.spec.kind}: "
             f"{run.data.spec.num_train} train / {run.data.spec.num_test} test examples")
    say(env, f"budget {durations.total_steps} steps = {durations.epochs:.4g} epochs; eps_eff {s.initial:g} = lr "
             f"{torch_lr(s.initial, run.momentum):g} / (1 - {run.momentum:g}); T = eps_eff / B = "
             f"{s.initial / plan.global_batch_size:.4g}; decay x1/{s.gamma:.4g} ten times from step {durations.total_steps // 2}")


def loop(run: Run, log: MetricsLog) -> tuple[str, int | None]:
    """The optimizer steps from the current one to the end, a stop request or divergence: (status, diverged_at)."""
    env, cfg, plan, durations, state = run.env, run.cfg, run.plan, run.durations, run.state
    stop = StopRequest(run.run_dir, run.started, lambda text: say(env, text))
    flags = distributed.StepFlags(env.world_size)
    saved_at = [state.step]  # the step of the newest checkpoint (0: none yet)
    watch = StallWatch(stop, env.rank, lambda: resumes_from(saved_at[0]), PeerLost.exit_code) \
        if env.world_size > 1 else None
    ledger = None
    shown = env.is_main and cfg.log.progress
    bar = tqdm(total=durations.total_steps, initial=state.step, disable=not (shown and on_terminal()),
               unit="step", dynamic_ncols=True)
    lines = ProgressLines(durations.total_steps, state.step, enabled=shown and not on_terminal())
    last_save = time.time()
    first = state.step
    try:
        for step in range(state.step, durations.total_steps):
            if watch is not None:
                watch.begin(step)
            eff = run.schedule.at(step)
            lr = torch_lr(eff, run.momentum)
            want_log = (step + 1) % cfg.log.every_steps == 0 or step + 1 == durations.total_steps
            t0 = time.perf_counter()
            stats, norms = train_step(run.engine, run.objective, run.data.train_micro_batches(step), plan, lr, want_log)
            stats = distributed.all_reduce_sum(stats)  # a device collective: the host does not wait for it
            if ledger is None:
                ledger = Ledger(durations.final_window_start, cfg.divergence.max_loss, stats[0], state.tail_loss_sum,
                                state.tail_steps)
            ledger.add(step, run.objective.loss(stats))
            state.step = step + 1
            # Agreed over ranks: a stop request (any rank) and a time-based checkpoint (rank 0's clock: saving may
            # be collective, e.g. the language model's hidden state is gathered over ranks).
            stopping, minutes_due = flags.exchange(stop.requested(), env.is_main and cfg.checkpoint.every_minutes is not None
                                                   and time.time() - last_save >= 60 * cfg.checkpoint.every_minutes)
            if watch is not None:
                watch.end()
            if step == first:  # start-up is over (compile, autotuning, first collectives): the steady-state timeout
                distributed.set_timeout(cfg.distributed.timeout_minutes)
            final = state.step == durations.total_steps  # a stop requested at the end is just the end
            eval_due = bool(durations.eval_every) and state.step % durations.eval_every == 0 and not final
            ckpt_due = not final and (stopping or minutes_due or (bool(durations.checkpoint_every)
                                                                   and state.step % durations.checkpoint_every == 0))
            if want_log or eval_due or ckpt_due or final:
                train_stats, norms, diverged_at = read_back(run, stats, norms, ledger)  # the only device sync
                if diverged_at is not None:
                    say(env, f"training loss diverged at step {diverged_at} (noticed at step {state.step}); stopping "
                             "(exit 0, status diverged)")
                    state.step = diverged_at
                    return DIVERGED, diverged_at
            state.train_seconds += time.perf_counter() - t0
            if want_log:
                rate = examples_per_second(run)
                log.write(record.progress_record(state.step, durations, train_stats, lr, eff, plan.global_batch_size, rate, norms))
                bar.set_postfix(loss=f"{train_stats['loss']:.4f}", lr=f"{lr:.3g}", ex_s=f"{rate:.0f}", refresh=False)
                lines.at(state.step, f"loss {train_stats['loss']:.4f}, lr {lr:.3g}, {rate:.0f} examples/s")
            bar.update(1)
            if eval_due:
                log.write({"step": state.step, **evaluate(run.engine, run.objective, run.data)})
            if ckpt_due:
                path = save_checkpoint(run)
                last_save, saved_at[0] = time.time(), state.step
            if stopping and not final:
                if stop.interrupted:
                    raise Interrupted(f"interrupted at step {state.step}: checkpoint saved to {path}; rerun the same "
                                      "command to resume")
                say(env, f"stop requested ({stop.signal_name or 'another rank'}): checkpoint saved at step {state.step}")
                if env.is_main and (note := requeue_slurm_job()):
                    say(env, note)
                return INTERRUPTED, None
    except Exception as e:
        if env.world_size > 1 and distributed.is_timeout(e):
            raise peer_lost(e, env.rank, state.step, saved_at[0], cfg.distributed.timeout_minutes) from None
        raise
    finally:
        if watch is not None:
            watch.close()
        bar.close()
        stop.restore()
    return COMPLETED, None


def peer_lost(error: Exception, rank: int, step: int, saved_at: int, timeout_minutes: float) -> PeerLost:
    """A collective that timed out (distributed.timeout_minutes) or lost its peer, as one line."""
    why = (str(error).splitlines() or [type(error).__name__])[0][:200]
    return PeerLost(f"rank {rank}: a collective after step {step} waited for another rank and failed ({why}): a rank "
                    f"froze, stopped or was lost; {resumes_from(saved_at)}; raise distributed.timeout_minutes (now "
                    f"{timeout_minutes:g}) if a step or a checkpoint legitimately takes longer")


def resumes_from(step: int) -> str:
    what = f"from its checkpoint at step {step}" if step else "from the start (no checkpoint yet)"
    return f"rerun the same command to resume {what}"


def on_terminal() -> bool:
    return sys.stderr.isatty()


class ProgressLines:
    """The progress bar's stand-in off a terminal (a SLURM .out file, a pipe), where tqdm's carriage-return
    frames pile up: one plain line at each tenth of the run, or after `seconds` without one, at a log step."""

    def __init__(self, total: int, start: int, enabled: bool, seconds: float = 300.0):
        self.total, self.enabled, self.seconds = total, enabled, seconds
        self.tenth = start * 10 // max(total, 1)
        self.last = time.time()

    def at(self, step: int, text: str) -> None:
        tenth = step * 10 // max(self.total, 1)
        if not self.enabled or (tenth == self.tenth and time.time() - self.last < self.seconds):
            return
        self.tenth, self.last = tenth, time.time()
        print(f"harness: step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%): {text}", flush=True)


def read_back(run: Run, stats: torch.Tensor, norms: dict, ledger: Ledger) -> tuple[dict, dict, int | None]:
    """Copy the step's statistics, norms and the ledger to the host in one transfer: (train stats, norms as
    floats, the first diverged step or None). Updates the run's final-loss window."""
    names = list(norms)
    flat = torch.cat([stats.double(), ledger.snapshot(), *(norms[k].double().reshape(1) for k in names)]).tolist()
    n = len(stats)
    first, run.state.tail_loss_sum, run.state.tail_steps = Ledger.unpack(*flat[n:n + 3])
    train_stats = run.objective.summarize(torch.tensor(flat[:n], dtype=torch.float64))
    return train_stats, dict(zip(names, flat[n + 3:])), first


def train_step(engine, objective, micro_batches, plan, lr: float, want_norms: bool):
    """One optimizer step: accumulate the gradient of the global-batch mean over A micro-steps, then step."""
    stats = None
    for i, batch in enumerate(micro_batches):
        s = engine.micro_step(objective, batch, plan.global_batch_size, i)
        stats = s if stats is None else stats + s
    return stats, engine.step(lr, want_norms)


def examples_per_second(run: Run) -> float:
    return run.state.step * run.plan.global_batch_size / max(run.state.train_seconds, 1e-9)


@torch.no_grad()
def evaluate(engine, objective, data, split: str = "test") -> dict[str, float]:
    """The test metric over the whole test split (each example once, shared over ranks), BN in eval mode;
    split "train": the same over the training set (eval.train_loss)."""
    model = engine.module
    model.eval()
    stats = None
    for batch in data.eval_batches(split) if split != "test" else data.eval_batches():
        with engine.autocast():
            _, s = objective(model, batch)
        stats = s if stats is None else stats + s
    model.train()
    if stats is None:  # this rank's share is empty (more ranks than test examples)
        stats = torch.zeros(len(objective.stat_names), dtype=torch.float64, device=next(model.parameters()).device)
    return {f"{split}_{k}": v for k, v in objective.summarize(distributed.all_reduce_sum(stats).cpu()).items()}


def save_checkpoint(run: Run) -> Path | None:
    """Every rank calls this at the same step (the objective's state may be gathered over ranks); rank 0 writes
    (and gets the checkpoint's path; other ranks None)."""
    snapshot = asdict(run.state)
    snapshot["wall_seconds"] = run.state.wall_seconds + (time.time() - run.started)
    return run.checkpoints.save(run.state.step, {**run.engine.state_dict(), "rng": rng_state(), "state": snapshot,
                                          "objective": run.objective.state_dict()})


def finish(run: Run, log: MetricsLog, status: str, diverged_at: int | None) -> dict:
    """Final evaluation, final weights and result.json (completed or diverged); or just report (interrupted)."""
    env, state = run.env, run.state
    metrics = {}
    if status == COMPLETED:
        metrics = evaluate(run.engine, run.objective, run.data)
        if run.cfg.eval.train_loss:
            metrics.update({f"train_set_{k[len('train_'):]}": v for k, v in
                            evaluate(run.engine, run.objective, run.data, "train").items()})
        log.write({"step": state.step, **metrics})
        if env.is_main:
            record.write_final(run.run_dir, run.engine.module.state_dict(), state.step, run.cfg)
    extra = {}
    if run.engine.noise is not None and status != INTERRUPTED:
        extra = {k: float(v) for k, v in run.engine.noise.values().items()}
    result = record.result_record(status, state.step, run.durations, state.final_train_loss, run.objective, metrics,
                                  diverged_at, examples_per_second(run), state.wall_seconds + (time.time() - run.started),
                                  run.parameters, run.plan, state.segments, **extra)
    if status != INTERRUPTED and env.is_main:
        record.write_result(run.run_dir, result)
        say(env, f"{record.summary(result)}; result in {run.run_dir / 'result.json'}")
    return result
