"""`make gpu-check`: everything a lent GPU should confirm, in one command of at most about 8 minutes, one summary.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--skip-bench]
    python benchmarks/gpu_check.py --cpu      # the same steps, tiny, on the CPU (CI: keeps this script working)

1. the tests marked `gpu` (nvjpeg decoding; the nccl ghost-BN test needs 4 GPUs and says so);
2. a short real training under torchrun with nccl and bf16: with 2+ GPUs, 2 ranks whose ghost-BN groups span
   both (micro-batch 32 < 64: cross-rank ghost BN over nccl); with one GPU, one rank on the DeepSpeed engine,
   whose process group is nccl even at world size 1 (nccl cannot put two ranks on one GPU);
3. a STOP at the first step, then a resume, compared with an uninterrupted run under speed.deterministic
   (the GPU promise: bitwise at the same layout; see harness/train/numerics.py);
4. host syncs per steady-state step, counted by torch.cuda.set_sync_debug_mode("warn") (the target is 0);
5. benchmarks/gpu.py (throughput, fractions of peak, packing, JPEG pipeline, overhead, ghost BN, memory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def env(**extra) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))  # DeepSpeed's CPU op, built once
    e.update({k: str(v) for k, v in extra.items()})
    return e


def sh(cmd: list[str], timeout: float) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=timeout)
        return p.returncode, (p.stdout + p.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        return 124, f"timed out after {timeout:.0f} s: {e}"


def shards(work: Path) -> Path:
    from data_pipelines.synth import synth

    path = work / "cifar10"
    if not path.exists():
        synth("cifar10", path, train=1024, test=256, seed=0)
    return path


def base_args(data: Path, device: str, steps: int, *extra: str) -> list[str]:
    return ["--set", "data.name=cifar10", f"data.path={data}", "model.name=wrn", "model.depth=10", "model.width=1",
            "batch.global_batch_size=128", "budget.epochs=null", f"budget.steps={steps}", f"device={device}", "log.progress=false",
            "log.tensorboard=false", "checkpoint.every_minutes=null", *extra]


def gpu_tests(args) -> dict:
    code, out = sh([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs"], 300)
    return {"ok": code in (0, 5), "exit": code, "tail": out[-800:]}  # 5: nothing collected


def torchrun_training(args, work: Path) -> dict:
    import torch

    data = shards(work)
    device = "cpu" if args.cpu else "cuda"
    gpus = torch.cuda.device_count()
    if gpus >= 2 and not args.cpu:
        nproc, extra, what = 2, ["batch.micro_batch_size=32", "precision=bf16"], "2 ranks, nccl, cross-rank ghost BN"
    else:
        nproc, extra, what = 1, ["backend=deepspeed", "precision=bf16" if not args.cpu else "precision=fp32"], \
            "1 rank, DeepSpeed engine (its process group: nccl on a GPU, gloo on the CPU)"
    run_dir = work / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "harness",
           "train", str(ROOT / "yaml" / "cifar10_wrn16_4.yaml"), "--run-dir", str(run_dir),
           *base_args(data, device, 4 if args.cpu else 20, *extra)]
    code, out = sh(cmd, 300)
    result = json.loads((run_dir / "result.json").read_text()) if (run_dir / "result.json").exists() else {}
    return {"ok": code == 0 and result.get("status") == "completed", "what": what, "exit": code,
            "examples_per_second": result.get("examples_per_second"), "tail": "" if code == 0 else out[-1500:]}


def stop_and_resume(args, work: Path) -> dict:
    import torch

    data = shards(work)
    device = "cpu" if args.cpu else "cuda"
    common = base_args(data, device, 4 if args.cpu else 12, "speed.deterministic=true", "checkpoint.every_steps=100")
    config = str(ROOT / "yaml" / "cifar10_wrn16_4.yaml")
    ref, resumed = work / "uninterrupted", work / "resumed"
    code1, out1 = sh([sys.executable, "-m", "harness", "train", config, "--run-dir", str(ref), *common], 300)
    resumed.mkdir(parents=True, exist_ok=True)
    (resumed / "STOP").touch()  # seen at the first step: checkpoint at step 1, exit 0
    # Dated ahead: a STOP file older than the run counts as stale, left by a killed process, and is ignored
    # (harness/train/signals.py); this one must count as written during the run.
    ahead = time.time() + 3600
    os.utime(resumed / "STOP", (ahead, ahead))
    code2, out2 = sh([sys.executable, "-m", "harness", "train", config, "--run-dir", str(resumed), *common], 300)
    stopped = not (resumed / "result.json").exists() and (resumed / "checkpoints" / "step-00000001.pt").exists()
    code3, out3 = sh([sys.executable, "-m", "harness", "train", config, "--run-dir", str(resumed), *common], 300)
    if not ((ref / "checkpoints" / "final.pt").exists() and (resumed / "checkpoints" / "final.pt").exists()):
        return {"ok": False, "tail": (out1 + out2 + out3)[-2000:]}
    a = torch.load(ref / "checkpoints" / "final.pt", weights_only=True)["model"]
    b = torch.load(resumed / "checkpoints" / "final.pt", weights_only=True)["model"]
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    return {"ok": stopped and diff == 0.0, "stopped_at_step_1": stopped, "max_abs_diff": diff,
            "promise": "bitwise (speed.deterministic: true)"}


def syncs_per_step(args, work: Path) -> dict:
    """Host syncs of the steady state: (syncs of a 2S-step run - syncs of an S-step run) / S, each logging once."""
    import torch

    from harness.train.config import load_config
    from harness.train.trainer import train

    data = shards(work)
    device = "cpu" if args.cpu else "cuda"
    counts = {}
    steps_pair = (2, 4) if args.cpu else (10, 20)
    for steps in steps_pair:
        overrides = base_args(data, device, steps, f"log.every_steps={steps}")[1:]
        cfg = load_config(str(ROOT / "yaml" / "cifar10_wrn16_4.yaml"), overrides)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                train(cfg, work / f"syncs{steps}")
            finally:
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
        counts[steps] = sum("synchroniz" in str(w.message) for w in caught)
    per_step = (counts[steps_pair[1]] - counts[steps_pair[0]]) / (steps_pair[1] - steps_pair[0])
    return {"ok": per_step == 0 or device == "cpu", "per_steady_step": per_step, "counts": counts,
            "note": "" if device == "cuda" else "the CPU has no device syncs to count (tests/test_gpu_path.py counts host reads)"}


def bench(args, work: Path) -> dict:
    out = work / "gpu.json"
    code, text = sh([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--out", str(out), *(["--tiny"] if args.cpu else [])],
                    420 if not args.cpu else 600)
    report = json.loads(out.read_text()) if out.exists() else {}
    return {"ok": code == 0 and not any(k.endswith("_error") for k in report), "report": report,
            "tail": "" if code == 0 else text[-1500:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--cpu", action="store_true", help="run every step tiny on the CPU (CI)")
    p.add_argument("--skip-bench", action="store_true")
    args = p.parse_args()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        sys.exit("gpu-check: no CUDA device is visible; run it on a GPU node (or with --cpu to check the script)")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    steps = [("gpu-marked tests", gpu_tests), ("torchrun training (bf16)", torchrun_training),
             ("STOP + resume", stop_and_resume), ("host syncs per step", syncs_per_step)]
    if not args.skip_bench:
        steps.append(("benchmarks/gpu.py", bench))
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name() if torch.cuda.is_available()
              and not args.cpu else "cpu", "steps": {}}
    started = time.time()
    for name, step in steps:
        t0 = time.time()
        try:
            r = step(args, work) if step is not gpu_tests else step(args)
        except Exception as e:  # noqa: BLE001 - report and go on to the next check
            r = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        r["seconds"] = round(time.time() - t0, 1)
        report["steps"][name] = r
        print(f"gpu-check: {'ok  ' if r['ok'] else 'FAIL'} {name} ({r['seconds']} s)", flush=True)
    report["seconds"] = round(time.time() - started, 1)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"gpu-check: summary ({report['device']}, {report['date']}, {report['seconds']} s); details in {args.out}")
    for name, r in report["steps"].items():
        detail = {k: v for k, v in r.items() if k not in ("ok", "tail", "report", "seconds")}
        print(f"  {'ok  ' if r['ok'] else 'FAIL'} {name}: {json.dumps(detail)[:300]}")
    bench_report = report["steps"].get("benchmarks/gpu.py", {}).get("report", {})
    for key in ("wrn16_4", "resnet50", "jpeg", "overhead", "ghost_bn"):
        if key in bench_report:
            print(f"  {key}: {json.dumps(bench_report[key])[:400]}")
    sys.exit(0 if all(r["ok"] for r in report["steps"].values()) else 1)


if __name__ == "__main__":
    main()
