"""Run under torchrun by tests/test_data_train.py: each rank builds the streaming reader as the trainer does
(process group up, K loader workers) and records the example keys of every micro-batch and of evaluation.

    torchrun --nproc-per-node W tests/stream_probe.py SHARDS OUT WORKERS RESAMPLED EPOCHS
"""

import json
import sys
from pathlib import Path

import torch

from data_pipelines import ReaderOptions, build_data
from harness.recipe.batch_plan import make_batch_plan
from harness.train import distributed


def main(shards: str, out: str, workers: int, resampled: bool, epochs: float) -> None:
    env = distributed.setup("cpu")
    plan = make_batch_plan(32 * env.world_size, env.world_size, 16)  # A = 2 micro-batches of 16 per rank
    opts = ReaderOptions(workers=workers, shuffle_buffer=100, resampled=resampled, image_size=32, eval_resize=36,
                         gpu_decode=False, skip_bad_samples=False)
    src = build_data("imagenet", shards, True, 40, plan, 0, env.rank, env.device, torch.float32, opts)
    steps = int(epochs * src.per_epoch) // plan.accumulation_steps
    train = [k.tolist() for s in range(steps) for _, _, k in src.train_micro_batches(s, keys=True)]
    evaluated = [k.tolist() for _, _, k in src.eval_batches(keys=True)]
    distributed.barrier()  # every rank got here: nobody hung at an epoch's end
    Path(out, f"rank{env.rank}.json").write_text(json.dumps({"per_epoch": src.per_epoch, "train": train, "eval": evaluated}))
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "true", float(sys.argv[5]))
