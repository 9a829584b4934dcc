"""`harness sweep` and `harness sweep-task` (run by slurm/sweep_array.sh): argument parsing and dispatch to the
executors (local.py, slurm.py) and the dry run (dry_run.py). Light at import time."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from harness.core.errors import ConfigError, SweepError


def add_parsers(sub) -> None:
    p = sub.add_parser("sweep", help="expand a sweep spec into runs and run what is missing (local pool or SLURM array)")
    p.add_argument("spec", help="sweep spec YAML (see yaml/table1.yaml)")
    p.add_argument("--executor", choices=["local", "slurm"], default="local",
                   help="local (default): a pool of worker processes on this machine; slurm: a SLURM job array")
    p.add_argument("--dry-run", action="store_true", help="print the runs, the grid, the steps and the cost; run nothing")
    p.add_argument("--max-parallel", type=int, default=None,
                   help="local: worker processes (default: CPU cores); slurm: array tasks at once, %%P (default 16)")
    p.add_argument("--sweep-dir", help="where the run directories go (default runs/<spec name>)")
    p.add_argument("--throughput", type=float, help="examples/s of one GPU, for the GPU-hour estimate "
                                                    "(default: the spec's cost.examples_per_second_per_gpu)")
    packing = p.add_mutually_exclusive_group()
    packing.add_argument("--pack", action="store_true",
                         help="train every packable family in batched packs, on any device (default: where packing is "
                              "faster: not the 2-D conv nets, wrn and resnet, on CPU; the spec's executor.pack)")
    packing.add_argument("--no-pack", action="store_true", help="train every run on its own, never as a batched pack")
    p.add_argument("--wait", action="store_true", help="slurm: wait until the job array ends (sbatch --wait)")
    p.add_argument("-v", "--verbose", action="store_true", help="local: also print one line per finished run (status and test metric); failures always print")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("sweep-task")  # run by slurm/sweep_array.sh; no help=: argparse then lists it nowhere
    p.add_argument("task_file")
    p.add_argument("index", type=int)
    p.set_defaults(func=cmd_sweep_task)


def cmd_sweep(args) -> int:
    from harness.core.paths import require_directory
    from harness.sweep.spec import check_data_paths, load_spec
    from harness.sweep.state import is_finished

    sweep = load_spec(args.spec, allow_unchecked_models=args.dry_run)
    sweep_dir = Path(args.sweep_dir or Path("runs") / sweep.name)
    require_directory(sweep_dir, "--sweep-dir")
    pack = True if args.pack else False if args.no_pack else sweep.spec.executor.pack  # None: packed.pack_choice
    if args.max_parallel is not None and args.max_parallel < 1:
        raise ConfigError("--max-parallel must be at least 1")
    if args.dry_run:
        from harness.sweep.dry_run import dry_run_report

        print(dry_run_report(sweep, sweep_dir, args.executor, args.max_parallel, pack,
                             args.throughput or sweep.spec.cost.examples_per_second_per_gpu))
        return 0
    # Before any run directory or array job exists; finished runs need no data (a complete sweep resubmitted
    # after its data was moved still reports that nothing is left to run).
    check_data_paths(run.config for run in sweep.runs if not is_finished(run.dir(sweep_dir)))
    if sweep.spec.search == "adaptive":
        if args.executor == "slurm":
            from harness.sweep.search import submit_search

            if args.wait:
                raise ConfigError("--wait with search: adaptive: the search's rounds go on in planner jobs after "
                                  "sbatch returns; drop --wait and watch .sweep/search.json (done: true) or squeue")
            return submit_search(sweep, sweep_dir, Path(args.spec), args.max_parallel or 16, pack)
        from harness.sweep.search import run_search

        return run_search(sweep, sweep_dir, args.max_parallel or os.cpu_count() or 1, pack, args.verbose)
    if args.executor == "slurm":
        from harness.sweep.slurm import submit_sweep

        return submit_sweep(sweep, sweep_dir, args.max_parallel or 16, pack, args.wait)
    from harness.sweep.local import run_sweep

    return run_sweep(sweep, sweep_dir, args.max_parallel or os.cpu_count() or 1, pack, args.verbose)


def cmd_sweep_task(args) -> int:
    from harness.sweep.slurm import run_task_file

    outcomes = run_task_file(Path(args.task_file), args.index)
    counts = Counter(o.status for o in outcomes)
    print("sweep-task: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), flush=True)
    if counts["failed"]:
        raise SweepError(f"{counts['failed']} runs of array task {args.index} failed (see error.txt in their run directories)")
    return 0
