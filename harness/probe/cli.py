"""`harness probe CONFIG ...` and `harness probe --branch RUN_DIR[:STEP] ...`: argument parsing and dispatch."""

from __future__ import annotations

import os

from harness.core.cliargs import add_config_args, given_config
from harness.core.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("probe", help="before you buy: the regime boundary (largest stable / optimal rate vs B, "
                                     "B_simple), or B_crit by branching from a checkpoint (--branch)")
    add_config_args(p, "override config keys of CONFIG (before or after it); not with --branch")
    p.add_argument("--batch-sizes", type=int, nargs="+", metavar="B",
                   help="batch sizes to probe (default: B/4, B, 4B, 16B of the config)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps of every probe run (default 200), or of every branch (default 400)")
    p.add_argument("--lr-range", type=int, nargs=2, metavar=("LO", "HI"),
                   help="log2 range of eps_eff (default: the config's rate 2^-5 .. 2^4; widened when it does not "
                        "bracket the optimum and the stability edge)")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per (B, eps_eff) (default 1), or data orders per branch (default 3)")
    p.add_argument("--out", help="output directory (default runs/probe-<config>-<run id>, or <RUN_DIR>-branch-<STEP>)")
    p.add_argument("--max-parallel", type=int, default=None, help="worker processes (default: CPU cores)")
    b = p.add_argument_group("branching (--branch)")
    b.add_argument("--branch", metavar="RUN_DIR[:STEP]", help="branch from this run's checkpoint at STEP (default: "
                                                              "its newest step checkpoint)")
    b.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32],
                   help="batch multipliers: B' = k B at eps_eff x k (default 1 2 4 8 16 32)")
    b.add_argument("--metric", default="test_loss", help="the loss counted to the target (default test_loss)")
    b.add_argument("--target", type=float, help="loss target (default: half-way between the k = 1 branch's first and last losses)")
    b.add_argument("--tolerance", type=float, default=0.2, help="allowed excess over perfect 1/k scaling (0.2)")
    b.add_argument("--eval-every", type=int, help="evaluate every N steps (default: every step up to 400 steps)")
    p.set_defaults(func=cmd_probe)


def cmd_probe(args) -> int:
    parallel = args.max_parallel or os.cpu_count() or 1
    if parallel < 1:
        raise ConfigError("--max-parallel must be at least 1")
    config = given_config(args)
    if args.branch:
        if config or args.overrides or args.batch_sizes:
            raise ConfigError("probe --branch takes RUN_DIR[:STEP] and the branching options, not a CONFIG, --set or "
                              "--batch-sizes: the branches inherit the trunk's config")
        from harness.probe.branch import run_branches

        run_branches(args.branch, args.k, args.steps or 400, args.metric, args.target, args.tolerance,
                     args.eval_every, args.out, parallel, args.seeds or 3)
        return 0
    if not config:
        raise ConfigError("probe: give a CONFIG to probe, or --branch RUN_DIR[:STEP]")
    from harness.probe.probe import check_args, run_probe

    check_args(args.steps or 200, args.seeds or 1, args.batch_sizes)
    run_probe(config, args.overrides, args.batch_sizes, args.steps or 200, args.lr_range, args.seeds or 1,
              args.out, parallel)
    return 0
