"""`harness data synth|convert|verify`: making and checking shard directories. Light at import time (the
`harness` CLI builds every parser at start-up); each command imports what it needs."""

from __future__ import annotations

import argparse
from pathlib import Path

from data_pipelines.formats import SOURCES


def cmd_data_synth(args) -> int:
    if args.train is None:
        args.train = 16384 if args.kind == "nqm" else 512
    if args.kind == "nqm":
        from data_pipelines.nqm import synth_nqm

        manifest = synth_nqm(args.dest, args.train, args.dim, args.lambda_max, args.power, args.sigma, args.seed)
        p = manifest["nqm"]
        print(f"wrote the noisy quadratic to {args.dest}: {args.train} examples, d = {p['dim']}, h_j = "
              f"{p['lambda_max']:g} j^-{p['power']:g}, sigma = {p['sigma']:g} (manifest only)")
        return 0
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


def add_parsers(sub) -> None:
    data = sub.add_parser("data", help="make dataset shards").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="write small synthetic shards in a dataset's exact format (for tests)")
    p.add_argument("kind", choices=["cifar10", "cifar100", "mnist", "ptb", "imagenet", "nqm"], help="the dataset format to imitate")
    p.add_argument("dest", help="output directory (shards + manifest.json)")
    p.add_argument("--train", type=int, default=None,
                   help="training examples, or tokens for ptb (default 512; nqm: 16384)")
    p.add_argument("--test", type=int, default=256, help="test (imagenet: val) examples, or tokens for ptb (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the synthetic examples (default 0)")
    q = p.add_argument_group("nqm (the noisy quadratic model, data_pipelines/nqm.py)")
    q.add_argument("--dim", type=_positive_int, default=32, help="dimensions d (default 32)")
    q.add_argument("--lambda-max", type=float, default=1.0, help="largest curvature h_1 (default 1)")
    q.add_argument("--power", type=float, default=1.0, help="h_j = lambda_max j^-power (default 1, Zhang et al.)")
    q.add_argument("--sigma", type=float, default=1.0, help="noise: Var(x_j) = sigma^2 / h_j, Sigma = sigma^2 H (default 1)")
    p.set_defaults(func=cmd_data_synth)

    p = data.add_parser(
        "convert", help="convert a standard distribution to shards + manifest.json",
        description="Convert a standard distribution to webdataset shards + manifest.json. Re-running the same "
                    "command keeps complete, verified shards. SRC per KIND: "
                    + "; ".join(f"{k}: {v}" for k, v in SOURCES.items()))
    p.add_argument("kind", choices=list(SOURCES), help="the dataset (its SRC: see above)")
    p.add_argument("src", help="the source file or folder (see above; digits, mnist1d: '-')")
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
    p.add_argument("dir", help="a shard directory (with manifest.json)")
    p.set_defaults(func=cmd_data_verify)
