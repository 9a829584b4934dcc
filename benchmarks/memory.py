"""CPU training with freed memory kept in the process (harness/core/memory.py) against glibc's defaults.

    python benchmarks/memory.py [--steps 6] [--batch 128] [--repeats 2] [--out memory.json]

Each measurement runs in a fresh interpreter (malloc settings are per process), alternating the two settings:
- an fp64 WRN-10-1 run as the tests train it (synthetic CIFAR-format shards, B = --batch in micro-batches of 64,
  --steps steps, eval on 256 images), timed around `train()`, 1 thread;
- `nn.BatchNorm2d` forward + backward on a (512, 64, 16, 16) fp32 input, median of 20, 1 thread.
Prints each time and the ratio kept / default (below 1: faster with freed memory kept), and the minor page faults
of each run. Figures and how they were measured: docs/cpu_speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, statistics, sys, tempfile, time
import torch
torch.set_num_threads(1)
from harness.core.memory import keep_freed_memory
malloc = keep_freed_memory()
what, shards, steps, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
if what == "wrn":
    from harness.train.config import load_config
    from harness.train.trainer import train
    cfg = load_config(None, ["data.name=cifar10", f"data.path={shards}", "model.name=wrn", "model.depth=10",
                             "model.width=1", f"batch.global_batch_size={batch}", "batch.max_micro_batch_size=64",
                             f"budget.steps={steps}", "log.progress=false", "log.tensorboard=false",
                             "checkpoint.every_minutes=null", "precision=fp64", "device=cpu"])
    t = time.perf_counter()
    train(cfg, tempfile.mkdtemp())
    seconds = time.perf_counter() - t
else:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, 16, 16, generator=g).requires_grad_()
    grad = torch.randn(512, 64, 16, 16, generator=g)
    bn = torch.nn.BatchNorm2d(64)
    times = []
    for i in range(25):
        x.grad = None
        bn.zero_grad(set_to_none=True)
        t = time.perf_counter()
        bn(x).backward(grad)
        times.append(time.perf_counter() - t)
    seconds = statistics.median(times[5:])
print(json.dumps({"malloc": malloc, "seconds": seconds,
                  "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0}))
"""


def measure(what: str, keep: bool, shards: Path, steps: int, batch: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HARNESS_KEEP_FREED_MEMORY": "1" if keep else "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, what, str(shards), str(steps), str(batch)], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"benchmarks/memory.py: the {what} measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="WRN training steps (default 6)")
    p.add_argument("--batch", type=int, default=128, help="WRN global batch size (default 128)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each setting, alternated (default 2)")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from data_pipelines.synth import synth

    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "cifar10"
        synth("cifar10", shards, train=512, test=256, seed=0, per_shard=200)
        for what, label in (("wrn", f"fp64 WRN-10-1, B = {args.batch}, {args.steps} steps (train())"),
                            ("bn", "nn.BatchNorm2d fwd+bwd, (512, 64, 16, 16) fp32 (median of 20)")):
            runs = {True: [], False: []}
            for _ in range(args.repeats):
                for keep in (True, False):
                    runs[keep].append(measure(what, keep, shards, args.steps, args.batch))
            kept, default = (statistics.median(r["seconds"] for r in runs[k]) for k in (True, False))
            report[what] = {"kept_seconds": kept, "default_seconds": default, "ratio": kept / default,
                            "kept_minor_faults": [r["minor_faults"] for r in runs[True]],
                            "default_minor_faults": [r["minor_faults"] for r in runs[False]],
                            "malloc": runs[True][0]["malloc"]}
            unit, scale = ("s", 1) if what == "wrn" else ("ms", 1e3)
            print(f"{label}: freed memory kept {kept * scale:.3g} {unit}, glibc defaults {default * scale:.3g} {unit}, "
                  f"ratio {kept / default:.2f}; minor page faults {report[what]['kept_minor_faults']} against "
                  f"{report[what]['default_minor_faults']}", flush=True)
    print(f"malloc: {report['wrn']['malloc']}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
