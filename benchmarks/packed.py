"""Packed runs against the same runs one by one, on whatever device there is (the CPU here), as a ratio in one run.

A pack (harness/train/packed.py) trains R runs that differ only in rate, seed, optimizer or weight decay as one
batched model. This script times R runs trained one after another with `harness train` against the same R runs
as one `train_pack`, both as marginal step times (the wall time of a long run minus a short one, over the extra
steps: start-up, data loading and imports cancel), and prints images per second of each, their ratio, and what the
sweep executor does by default with such runs on this device (packs or not, harness.train.packed.pack_choice) with
that choice's ratio to one by one (1.00 when it trains them one by one).

    python benchmarks/packed.py                          # MLP on digits (R = 32), WRN-10-1 on CIFAR-shaped data (R = 8),
                                                         # the ghost-BN demo's convnet on MNIST-1D (R = 10)
    python benchmarks/packed.py --families wrn --runs 4 --threads 1

On a GPU the figure the issue asks for (WRN-16-4, B = 128, pack of 8) is benchmarks/gpu.py's `wrn16_4`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from gpu import marginal  # noqa: E402

FAMILIES = {  # name: (data kind, model keys, batch size, default runs, short and long steps)
    "mlp": ("digits", ["model.name=mlp", "model.hidden=[128,128]"], 64, 32, (10, 110)),
    "wrn": ("cifar10", ["model.name=wrn", "model.depth=10", "model.width=1"], 64, 8, (2, 12)),
    "convnet": ("mnist1d", ["model.name=convnet", "model.ghost_batch_size=32"], 64, 10, (5, 45)),
}


def shards_for(kind: str, work: Path) -> Path:
    dest = work / kind
    if kind in ("digits", "mnist1d"):  # embedded
        from data_pipelines.convert import convert

        convert(kind, "-", dest)
    else:
        from data_pipelines.synth import synth

        synth(kind, dest, train=2048, test=64, seed=0)
    return dest


def measure(family: str, runs: int, device: torch.device, work: Path) -> tuple[float, float]:
    """(img/s of the runs one by one, img/s of the same runs as one pack)."""
    from harness.train.config import load_config
    from harness.train.packed import train_pack
    from harness.train.trainer import train

    kind, model, b, _, (short, long) = FAMILIES[family]
    shards = shards_for(kind, work)

    def cfg(r: int, steps: int):
        return load_config(None, [f"data.name={kind}", f"data.path={shards}", *model, f"batch.global_batch_size={b}",
                                  f"budget.steps={steps}", f"device={device.type}", f"seed={r % 4}",
                                  f"optim.effective_lr={0.05 * (r + 1)}", "log.progress=false", "log.tensorboard=false",
                                  "log.every_steps=50", "checkpoint.every_minutes=null"])

    def separate(steps: int) -> None:
        for r in range(runs):
            train(cfg(r, steps), Path(tempfile.mkdtemp(dir=work)))

    def packed(steps: int) -> None:
        train_pack([cfg(r, steps) for r in range(runs)], [Path(tempfile.mkdtemp(dir=work)) for _ in range(runs)])

    packed(short)  # warm-up, discarded: the first run in a process pays imports and vmap's first trace
    t_sep = marginal(separate, short, long, device)
    t_pack = marginal(packed, short, long, device)
    return runs * b / t_sep, runs * b / t_pack


def default_choice(family: str, device: torch.device) -> tuple[bool, str]:
    """What `harness sweep` does with such runs here unless told --pack / --no-pack (harness.train.packed.pack_choice)."""
    from harness.train.packed import pack_choice

    config = {"model": {"name": FAMILIES[family][1][0].split("=")[1]}, "data": {"name": FAMILIES[family][0]},
              "optim": {}, "precision": "fp32", "backend": "ddp", "device": device.type}
    return pack_choice(config, None, device.type == "cuda")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--runs", type=int, default=0, help="runs per pack (default: 32 for the MLP, 8 for the WRN, 10 for the convnet)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="packed-bench-"))
    print(f"torch {torch.__version__}, {device.type}, {torch.get_num_threads()} threads")
    for family in args.families:
        runs = args.runs or FAMILIES[family][3]
        one, pack = measure(family, runs, device, work)
        packs, why = default_choice(family, device)
        print(f"{family} (B = {FAMILIES[family][2]}, {runs} runs): one by one {one:,.0f} img/s, packed {pack:,.0f} img/s, "
              f"packed / one by one {pack / one:.2f}; the sweep executor's default on {device.type}: "
              f"{'packs' if packs else 'one by one'} ({why}), {(pack / one if packs else 1.0):.2f}x one by one", flush=True)


if __name__ == "__main__":
    main()
