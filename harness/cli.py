"""`harness` command line: train, plan, data, sweep, analyze, demo.

Errors a user can fix (config, plan, data, launch) print one line, `harness: error: ...`, and exit with
the error's own code (2 config, 3 plan, 4 data, 5 launch, 6 checkpoint, 7 sweep); `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from harness.errors import HarnessError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see yaml/)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.effective_lr=0.5 batch.global_batch_size=1024")


def _load(args):
    from harness.config import load_config

    return load_config(args.config, args.overrides)


def default_run_dir(config_path: str, cfg) -> Path:
    from harness.config import config_hash

    return Path("runs") / f"{Path(config_path).stem}-{config_hash(cfg)}"


def cmd_train(args) -> int:
    from harness.trainer import train

    cfg = _load(args)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.config, cfg)
    result = train(cfg, run_dir)
    if result["status"] == "completed" and int(os.environ.get("RANK", "0")) == 0:
        tb = run_dir / "tb"
        print(f"TensorBoard logs: {tb}  (view: tensorboard --logdir {tb.parent} --port 6006, then open http://localhost:6006)")
    return 0


def cmd_plan(args) -> int:
    import torch

    import models
    from data_pipelines import describe, examples_per_epoch
    from harness.distributed import world_size_from_env
    from harness.plan import make_batch_plan, to_steps

    cfg = _load(args)
    world = args.world_size or world_size_from_env()
    plan = make_batch_plan(cfg.batch.global_batch_size, world, cfg.batch.micro_batch_size,
                           cfg.batch.max_micro_batch_size, cfg.model.ghost_group_size())
    spec, source = describe(cfg.data.name, cfg.data.path)
    per_epoch = examples_per_epoch(spec, plan.global_batch_size, cfg.model.sequence_length())
    d = to_steps(cfg.budget.steps, cfg.budget.epochs, per_epoch, plan.global_batch_size)
    with torch.device("meta"):  # shapes only: no memory, no initialisation (ResNet-50, WRN-28-10 on a login node)
        n_params = models.count_parameters(models.build_model(cfg.model, spec))
    info = {**plan.as_dict(), "parameters": n_params, "model": cfg.model.name, "steps": d.total_steps,
            "epochs": d.epochs, "train_examples": spec.num_train, "data_source": source}
    if args.json:
        print(json.dumps(info))
    else:
        print(f"plan:       {plan.describe()}")
        print(f"model:      {cfg.model.name}, {n_params:,} parameters")
        print(f"budget:     {d.total_steps} steps = {d.epochs:.4g} epochs of {per_epoch} examples ({source})")
    return 0


def cmd_data_synth(args) -> int:
    from data_pipelines.synth import synth

    manifest = synth(args.kind, args.dest, args.train, args.test, seed=args.seed)
    sizes = ", ".join(f"{k}: {v['size']}" for k, v in manifest["splits"].items())
    print(f"wrote synthetic {args.kind} shards to {args.dest} ({sizes})")
    return 0


def cmd_data_convert(args) -> int:
    from data_pipelines.convert import convert

    manifest = convert(args.kind, args.src, Path(args.dest), args.shard_size, args.shard_bytes, args.val_labels,
                       args.skip_bad, args.threads)
    sizes = ", ".join(f"{k}: {v['size']} in {len(v['shards'])} shards" for k, v in manifest["splits"].items())
    print(f"wrote {args.kind} shards to {args.dest} ({sizes})")
    return 0


def cmd_data_verify(args) -> int:
    from data_pipelines.shards import read_manifest, verify_shards

    root = Path(args.dir)
    manifest = read_manifest(root)
    for split, entry in manifest["splits"].items():
        verify_shards(root, entry)
        print(f"{split}: {len(entry['shards'])} shards match their sha256 ({entry['size']} examples)")
    return 0


def _bytes(text: str) -> int:
    """'1G', '500M', '64k' or a plain number of bytes (decimal units, as file systems report sizes)."""
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
    t = text.strip().lower().rstrip("b")
    try:
        value = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 1G, 500M or 1000000") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a shard size must be positive")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description="Large-batch SGD scaling harness (Smith, Elsen & De 2020).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one run from a config")
    _add_config_args(p)
    p.add_argument("--run-dir", help="run directory (default: runs/<config>-<hash>); an existing one is resumed")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="print the batch layout and parameter count without training")
    _add_config_args(p)
    p.add_argument("--world-size", type=int, help="number of ranks (default: $WORLD_SIZE or 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)

    from harness.sweep_cli import add_parsers

    add_parsers(sub)  # sweep, analyze, demo (harness/sweep_cli.py)

    data = sub.add_parser("data", help="make dataset shards").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="write small synthetic shards in a dataset's exact format (for tests)")
    p.add_argument("kind", choices=["cifar10", "cifar100", "mnist", "ptb", "imagenet"])
    p.add_argument("dest")
    p.add_argument("--train", type=int, default=512, help="training examples, or tokens for ptb (default 512)")
    p.add_argument("--test", type=int, default=256, help="test (imagenet: val) examples, or tokens for ptb (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_synth)

    from data_pipelines.formats import SOURCES

    p = data.add_parser(
        "convert", help="convert a standard distribution to shards + manifest.json",
        description="Convert a standard distribution to webdataset shards + manifest.json. Re-running the same "
                    "command keeps complete, verified shards. SRC per KIND: "
                    + "; ".join(f"{k}: {v}" for k, v in SOURCES.items()))
    p.add_argument("kind", choices=list(SOURCES))
    p.add_argument("src", help="the source file or folder (see above; digits: '-')")
    p.add_argument("dest", help="output directory")
    p.add_argument("--shard-size", type=_positive_int, default=None,
                   help="examples per shard (default 10000; ptb: 100,000-token chunks per shard, default 10)")
    p.add_argument("--shard-bytes", type=_bytes, default=None, help="imagenet: bytes per shard, e.g. 500M (default 1G)")
    p.add_argument("--val-labels", default=None, metavar="FILE",
                   help="imagenet with a flat val/ folder: LOC_val_solution.csv or 'FILENAME WNID' lines")
    p.add_argument("--skip-bad", action="store_true", help="imagenet: leave out unreadable images (listed in the manifest)")
    p.add_argument("--threads", type=_positive_int, default=8, help="imagenet: reader threads (default 8)")
    p.set_defaults(func=cmd_data_convert)

    p = data.add_parser("verify", help="check every shard of a shard directory against its sha256")
    p.add_argument("dir")
    p.set_defaults(func=cmd_data_verify)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except HarnessError as e:
        if args.debug:
            raise
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank fails alike: say it once
            print(f"harness: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code)
