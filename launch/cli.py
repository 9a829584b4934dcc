"""`python -m launch`: start `harness train` on this node, on several nodes, or across a SLURM job's nodes.

    python -m launch [launch options] CONFIG [harness train args: --set key=value ... --run-dir DIR]

Launch options may also come from the environment, which is how the sbatch scripts in slurm/ take them:
HARNESS_NPROC_PER_NODE, HARNESS_LAUNCHER, HARNESS_RDZV_PORT, HARNESS_MAX_RESTARTS, HARNESS_PYTHON (the Python that
runs the training processes) and HARNESS_DRY_RUN=1 (print the commands, start nothing).

Before anything starts, the config is loaded and the batch plan checked at the world size the launch gives, so
a typo or an impossible layout fails in seconds on one node, not after N nodes have started. The run directory
is made absolute (and chosen as `harness train` would if not given) so every node writes the same one.

Stop requests: SLURM's `--signal=B:USR1@T` reaches only the batch shell, which the sbatch scripts replace with
this process (`exec`). On SIGUSR1 it writes RUN_DIR/STOP; every rank sees it at the next step boundary
(harness/train/signals.py), rank 0 checkpoints and, inside SLURM, requeues the job (`scontrol requeue`). SIGUSR1 is
not forwarded as a signal: torchrun's agent does not handle it and would die of it. SIGTERM is forwarded to
the launcher child (torchrun/srun), which passes it on to the workers.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from harness.core.errors import HarnessError, LaunchError
from harness.cli import add_local_rank_arg, set_local_rank
from launch.core import LAUNCHERS, build_commands, local_gpu_count, quote, resolve_layout

ROOT = Path(__file__).resolve().parent.parent
# First words of a STOP file this launcher wrote; a stale one (the launcher was killed before it could remove
# it) is removed at the next start, or the requeued job would stop at its first step, forever.
STOP_MARKER = "SIGUSR1 forwarded by python -m launch"


def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    p = argparse.ArgumentParser(
        prog="python -m launch",
        description="Start `harness train` with torchrun (c10d rendezvous) or the deepspeed launcher, on this node "
                    "or across the nodes of a SLURM job (srun, one launcher per node).",
        epilog="Everything after CONFIG goes to `harness train`. Example inside an sbatch script: "
               "python -m launch yaml/cifar10_wrn16_4.yaml --set optim.effective_lr=4 --run-dir runs/lr4")
    p.add_argument("--nodes", type=int, help="number of nodes (inside SLURM: the job's; outside: default 1)")
    p.add_argument("--nproc-per-node", type=int, default=env.get("HARNESS_NPROC_PER_NODE") or None,
                   help="processes per node (default: $HARNESS_NPROC_PER_NODE, else the GPUs SLURM gave "
                        "(SLURM_GPUS_ON_NODE), else the visible GPUs, else 1)")
    p.add_argument("--launcher", choices=LAUNCHERS, default=env.get("HARNESS_LAUNCHER") or "torchrun",
                   help="per-node launcher (default: $HARNESS_LAUNCHER or torchrun); deepspeed: one node only")
    p.add_argument("--rdzv-endpoint", help="HOST[:PORT] of the rendezvous (default inside SLURM: the head node)")
    p.add_argument("--rdzv-port", type=int, default=env.get("HARNESS_RDZV_PORT") or None,
                   help="rendezvous port (default: $HARNESS_RDZV_PORT, else 20000 + job id mod 10000 in SLURM, else free)")
    p.add_argument("--rdzv-id", help="rendezvous id (default: the SLURM job id)")
    p.add_argument("--max-restarts", type=int, default=int(env.get("HARNESS_MAX_RESTARTS") or 0),
                   help="torchrun elastic restarts after a worker failure (default: $HARNESS_MAX_RESTARTS or 0)")
    p.add_argument("--python", default=env.get("HARNESS_PYTHON") or sys.executable,
                   help="Python for the training processes (default: $HARNESS_PYTHON or this one)")
    p.add_argument("--dry-run", action="store_true", default=env.get("HARNESS_DRY_RUN", "") not in ("", "0"),
                   help="print the exact commands and start nothing (also: HARNESS_DRY_RUN=1)")
    # A launcher that starts this entry appends its rank argument (`--local_rank=N`, `--local-rank=N`): accepted,
    # used only to fill in a missing LOCAL_RANK (harness/cli.py).
    add_local_rank_arg(p)
    p.add_argument("config", help="YAML config for harness train")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="more `harness train` arguments")
    return p


def training_args(config: str, rest: list[str]):
    """Parse the pass-through arguments exactly as `harness train` will, and load the config."""
    from harness.cli import build_parser as harness_parser
    from harness.train.config import default_run_dir, load_config

    try:
        args = harness_parser().parse_args(["train", config, *rest])
    except SystemExit as e:  # argparse already printed the problem
        raise LaunchError(f"the arguments after the config are not valid for `harness train`: {' '.join(rest)}") from e
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.config, cfg)
    return cfg, run_dir.absolute()


def check_plan(cfg, world_size: int) -> str:
    from harness.train.config import plan_of

    plan = plan_of(cfg, world_size)
    if cfg.backend == "deepspeed":  # a user DeepSpeed JSON that contradicts the plan fails here too
        from harness.train.deepspeed_engine import deepspeed_config

        deepspeed_config(plan, cfg.precision, cfg.optim.grad_clip_norm, cfg.deepspeed.config)
    return plan.describe()


def with_run_dir(rest: list[str], run_dir: Path) -> list[str]:
    """The pass-through args with --run-dir made absolute (or added), and without a launcher's --local_rank:
    every training process gets its own LOCAL_RANK from the launcher started here."""
    out, i = [], 0
    while i < len(rest):
        a = rest[i]
        if a in ("--run-dir", "--local_rank", "--local-rank") and i + 1 < len(rest):
            i += 2
            continue
        if a.startswith(("--run-dir=", "--local_rank=", "--local-rank=")):
            i += 1
            continue
        out.append(a)
        i += 1
    return out + ["--run-dir", str(run_dir)]


def say(text: str) -> None:
    print(f"launch: {text}", file=sys.stderr, flush=True)


def execute(cmd: list[str], env: dict, stop_file: Path) -> int:
    """Run the launcher command; turn SIGUSR1 into RUN_DIR/STOP, forward SIGTERM; return its exit status."""
    _remove_own_stop(stop_file, stale=True)
    child = subprocess.Popen(cmd, env=env)

    def on_usr1(signum, frame):
        from harness.core.io import atomic_write_text

        job = env.get("SLURM_JOB_ID")
        atomic_write_text(stop_file, f"{STOP_MARKER}{f' (SLURM job {job})' if job else ''}\n")
        say(f"SIGUSR1: wrote {stop_file}; the training processes stop at the next step boundary")

    def forward(signum, frame):
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGUSR1, on_usr1), (signal.SIGTERM, forward), (signal.SIGINT, signal.SIG_IGN))}
    try:
        code = child.wait()  # PEP 475: the wait resumes after each handler
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _remove_own_stop(stop_file)
    return 128 - code if code < 0 else code


def _remove_own_stop(stop_file: Path, stale: bool = False) -> None:
    try:
        if stop_file.read_text().startswith(STOP_MARKER):
            stop_file.unlink(missing_ok=True)
            if stale:
                say(f"removed a stale {stop_file} left by an earlier launch")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    set_local_rank(args.local_rank)
    try:
        cfg, run_dir = training_args(args.config, args.train_args)
        layout = resolve_layout(os.environ, launcher=args.launcher, nodes=args.nodes,
                                nproc_per_node=args.nproc_per_node, rdzv_endpoint=args.rdzv_endpoint,
                                rdzv_id=args.rdzv_id, port=args.rdzv_port, local_gpus=local_gpu_count)
        plan = check_plan(cfg, layout.world_size)
        commands = build_commands(layout, args.python, [args.config, *with_run_dir(args.train_args, run_dir)],
                                  os.environ, args.max_restarts)
    except HarnessError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    say(layout.describe())
    say(f"plan {plan}; backend {cfg.backend}; run dir {run_dir}")
    if args.dry_run:
        if layout.nnodes > 1 and not layout.slurm_job:
            say(f"run this same command on each of the {layout.nnodes} nodes:")
        for cmd in commands:
            print(quote(cmd), flush=True)
        sys.exit(0)
    if layout.nnodes > 1 and not layout.slurm_job:
        say(f"this is one of {layout.nnodes} nodes: start the same command on the others")
    env = dict(os.environ)
    # The training processes import the same harness as this launcher, wherever the job's cwd is.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    say(f"running: {quote(commands[0])}")
    sys.exit(execute(commands[0], env, run_dir / "STOP"))
