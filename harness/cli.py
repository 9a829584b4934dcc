"""`harness` command line: argument parsing and dispatch only. Each subpackage defines its own commands
(train and plan here; data: data_pipelines/cli.py; sweep: sweep/cli.py; analyze: analysis/cli.py; demo: demo.py;
probe: probe/cli.py),
and each command imports what it needs when it runs, so `harness analyze` never loads torch.

Errors a user can fix (config, plan, data, launch) print one line, `harness: error: ...`, and exit with
the error's own code (2 config, 3 plan, 4 data, 5 launch, 6 checkpoint, 7 sweep, 8 file system, 9 run dir in
use by another writer, 130 interrupted after a checkpoint); an OSError (disk full, read-only, permissions) is one
line naming the path and the errno, exit 8. `--debug` also prints the traceback and keeps the exit code.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import threading
import traceback
from pathlib import Path

from harness.core.errors import FileSystemError, HarnessError, Interrupted, PeerLost, os_error_message
from harness.core.cliargs import add_config_args, config_of
from harness.core.memory import keep_freed_memory
from harness.core.paths import require_directory
from harness.core.status import COMPLETED


def _add_config_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p, "override config keys, e.g. --set optim.effective_lr=0.5 batch.global_batch_size=1024")


def _load(args):
    from harness.train.config import load_config

    return load_config(config_of(args), args.overrides)


def cmd_train(args) -> int:
    from harness.train.config import default_run_dir
    from harness.train.trainer import train

    cfg = _load(args)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(config_of(args), cfg)
    require_directory(run_dir, "--run-dir")
    set_threads()
    result = train(cfg, run_dir)
    if result["status"] == COMPLETED and int(os.environ.get("RANK", "0")) == 0:
        tb = run_dir / "tb"
        print(f"TensorBoard logs: {tb}  (view: tensorboard --logdir {tb.parent} --port 6006, then open http://localhost:6006)")
    return 0


def set_threads() -> None:
    """The intra-op threads of this rank, by the sweep workers' rule (harness/core/threads.py), shared by the
    ranks on this node (LOCAL_WORLD_SIZE from torchrun, LOCAL_SIZE from the deepspeed launcher); said once."""
    from harness.core.threads import apply, choose_threads

    choice = choose_threads(int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1))
    apply(choice)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"harness: threads {choice.describe()}", flush=True)


def cmd_plan(args) -> int:
    from harness.train.describe import describe_run
    from harness.train.distributed import world_size_from_env

    cfg = _load(args)
    info, arithmetic = describe_run(cfg, args.world_size or world_size_from_env())
    if args.json:
        print(json.dumps({k: v for k, v in info.items() if k != "examples_per_epoch"}))
    else:
        print(f"plan:       {arithmetic}")
        print(f"model:      {info['model']}, {info['parameters']:,} parameters")
        print(f"budget:     {info['steps']} steps = {info['epochs']:.4g} epochs of {info['examples_per_epoch']} examples "
              f"({info['data_source']})")
    return 0


def add_local_rank_arg(p: argparse.ArgumentParser, nested: bool = False) -> None:
    """Accept the rank argument that launchers append: the deepspeed launcher runs `python -m harness
    --local_rank=N train ...` (deepspeed/launcher/launch.py, unless --no_local_rank), torch.distributed.launch
    `--local-rank=N` (older torch: `--local_rank`). LOCAL_RANK in the environment, which every launcher also
    exports, wins; the argument only fills it in when missing (set_local_rank). Hidden from --help."""
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, metavar="N",
                   default=argparse.SUPPRESS if nested else None, help=argparse.SUPPRESS)


def set_local_rank(local_rank) -> None:
    if local_rank is not None and not os.environ.get("LOCAL_RANK"):
        os.environ["LOCAL_RANK"] = str(local_rank)


def build_parser() -> argparse.ArgumentParser:
    from data_pipelines.cli import add_parsers as add_data_parsers
    from harness.analysis.cli import add_parser as add_analyze_parser
    from harness.demo import add_parser as add_demo_parser
    from harness.probe.cli import add_parser as add_probe_parser
    from harness.sweep.cli import add_parsers as add_sweep_parsers

    parser = argparse.ArgumentParser(prog="harness", description="Large-batch SGD scaling harness (Smith, Elsen & De 2020).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    add_local_rank_arg(parser)
    # The metavar names the commands a user types; `sweep-task` (run by slurm/sweep_array.sh) stays out of it.
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands (harness COMMAND --help for each)")

    p = sub.add_parser("train", help="train one run from a config")
    _add_config_args(p)
    p.add_argument("--run-dir", help="run directory (default: runs/<config>-<run id>); an existing one is resumed")
    add_local_rank_arg(p, nested=True)  # also after `train` (a launcher that appends it to the script's args)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="print the batch plan, parameter count and budget without training")
    _add_config_args(p)
    p.add_argument("--world-size", type=int, help="number of ranks (default: $WORLD_SIZE or 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)

    add_sweep_parsers(sub)  # sweep, sweep-task
    add_analyze_parser(sub)
    add_demo_parser(sub)
    add_probe_parser(sub)  # probe CONFIG | probe --branch RUN_DIR[:STEP]
    add_data_parsers(sub)  # data synth | convert | verify
    return parser


def main(argv: list[str] | None = None) -> None:
    keep_freed_memory()  # before any tensor: large CPU tensors reuse pages instead of faulting in new ones
    args = build_parser().parse_args(argv)
    set_local_rank(args.local_rank)
    previous_hook, threading.excepthook = threading.excepthook, _thread_os_error_hook(args.debug)
    try:
        code = args.func(args)
    except HarnessError as e:
        # Under torchrun every rank fails alike on a config, plan or data error: say it once; but a lost peer is
        # seen by the ranks still alive, each of which says so.
        _fail(str(e), e.exit_code, args.debug, every_rank=isinstance(e, PeerLost),
              prefix="harness: " if isinstance(e, Interrupted) else "harness: error: ")
    except OSError as e:
        # A rank's OSError is about its own files (DeepSpeed writes a checkpoint shard per rank): every rank says it.
        _fail(os_error_message(e), FileSystemError.exit_code, args.debug, every_rank=True)
    except KeyboardInterrupt:  # a second Ctrl-C (harness/train/signals.py), or one before training started
        if args.debug:
            traceback.print_exc()
        if int(os.environ.get("RANK", "0")) == 0:
            print("harness: interrupted: stopped at once, without a new checkpoint; rerun the same command to resume "
                  "from the last one", file=sys.stderr)
        sys.exit(130)
    finally:
        threading.excepthook = previous_hook
    sys.exit(code)


def _thread_os_error_hook(debug: bool):
    """TensorBoard writes its event file from a thread; on a full disk that thread dies with a traceback, and the
    writer re-raises the error in the main thread at the next write (MetricsLog names the path, main says it).
    The thread's own report becomes a warning line; other exceptions keep Python's default report."""
    def hook(info: threading.ExceptHookArgs) -> None:
        e = info.exc_value
        if isinstance(e, OSError) and not debug:
            what = os_error_message(e) if e.filename is not None else f"{e.strerror or e} ({errno.errorcode.get(e.errno, '?')})"
            print(f"harness: warning: background thread {info.thread.name if info.thread else '?'} stopped: {what}",
                  file=sys.stderr)
        else:
            threading.__excepthook__(info)
    return hook


def _fail(message: str, code: int, debug: bool, every_rank: bool, prefix: str = "harness: error: ") -> None:
    """Print `harness: error: MESSAGE` (rank 0, or every rank tagged with its number) and exit with `code`;
    --debug prints the traceback first (the exit code stays the error's, so scripts see the same code)."""
    rank = int(os.environ.get("RANK", "0"))
    if debug:
        traceback.print_exc()
    if rank == 0:
        print(f"{prefix}{message}", file=sys.stderr)
    elif every_rank:
        print(f"{prefix}rank {rank}: {message}", file=sys.stderr)
    sys.exit(code)
