"""What a run records, defined once for the trainer and for packed runs (harness/train/packed.py), so that a
change to what a run records is made in one place:

- `progress_record`: the metrics.jsonl / TensorBoard record of a logged training step;
- the final training loss: the mean train-mode loss over the last floor(S/20) steps (recipe.budget's window);
- `diverged`: the divergence rule (a non-finite loss, or one above divergence.max_loss);
- `result_record`: result.json, and `write_final` / `write_result` that put a finished run on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.core.io import atomic_save_torch, atomic_write_json, read_json
from harness.core.status import DIVERGED, FINISHED, is_finished
from harness.recipe.budget import Durations
from harness.train.config import Config, check_resumable, to_yaml
from harness.train.provenance import slurm_info


@dataclass
class TrainState:
    """Everything about progress that a checkpoint must carry besides model and optimizer."""

    step: int = 0
    train_seconds: float = 0.0  # time inside train steps, for examples/s
    wall_seconds: float = 0.0  # wall time of earlier segments of this run
    tail_loss_sum: float = 0.0  # training loss summed over the final window of steps
    tail_steps: int = 0
    segments: list = field(default_factory=list)  # layout of each segment (resumes)

    @property
    def final_train_loss(self) -> float | None:
        return self.tail_loss_sum / self.tail_steps if self.tail_steps else None


def segment(world_size: int, from_step: int) -> dict:
    """One start of a run: its world size, its first step and, inside SLURM, the job."""
    return {"world_size": world_size, "from_step": from_step, **slurm_info()}


def finished_result(run_dir: Path, cfg: Config) -> dict | None:
    """The result of a run directory that already holds this run, finished; else None (nothing, or to resume).
    A run directory of another run (a different science config) is refused."""
    check_resumable(run_dir, cfg)
    path = Path(run_dir) / "result.json"
    result = read_json(path) if path.exists() else None
    return result if is_finished(result) else None


def diverged(loss, max_loss: float | None):
    """The divergence rule, on a float or elementwise on a tensor of losses: non-finite, or above max_loss."""
    loss = torch.as_tensor(loss)
    bad = ~torch.isfinite(loss)
    return bad | (loss > max_loss) if max_loss is not None else bad


class Ledger:
    """The divergence check and the final-loss window, kept on the training device so that no step waits for
    the host: `add` every step (elementwise, for one run or a pack of runs), `read` at log intervals.

    `first_diverged` is the first step (1-based, as `diverged_at_step`) whose training loss broke the divergence
    rule; steps taken after it, until the next read, change nothing that is recorded: the final-loss window counts
    steps up to and including that one, exactly as a check after every step would.
    """

    def __init__(self, window_start: int, max_loss: float | None, like: torch.Tensor,
                 tail_sum: float = 0.0, tail_steps: int = 0):
        self.window_start, self.max_loss = window_start, max_loss
        self.first_diverged = torch.full_like(like, -1, dtype=torch.int64)
        self.tail_sum = torch.full_like(like, tail_sum, dtype=torch.float64)
        self.tail_steps = torch.full_like(like, tail_steps, dtype=torch.int64)

    def add(self, step: int, loss) -> None:
        """The mean training loss of optimizer step `step` (0-based), a device tensor."""
        fresh = self.first_diverged < 0
        self.first_diverged = torch.where(fresh & diverged(loss, self.max_loss), step + 1, self.first_diverged)
        if step >= self.window_start:
            self.tail_sum = self.tail_sum + torch.where(fresh, loss.double(), 0.0)
            self.tail_steps = self.tail_steps + fresh.to(torch.int64)

    def snapshot(self):
        """(first diverged step, final-window loss sum, its step count) stacked on the device, shape (3, *runs),
        to be read on the host together with the step's other values (one device sync)."""
        return torch.stack([self.first_diverged.double(), self.tail_sum, self.tail_steps.double()])

    @staticmethod
    def unpack(first: float, tail_sum: float, tail_steps: float) -> tuple[int | None, float, int]:
        """One run's (first diverged step or None, final-window loss sum, its step count) from a read snapshot."""
        return (None if first < 0 else int(first)), tail_sum, int(tail_steps)


def progress_record(step: int, durations: Durations, train_stats: dict, lr: float, effective_lr: float,
                    global_batch_size: int, examples_per_second: float, norms: dict) -> dict:
    """The record of a logged training step: metrics.jsonl and TensorBoard's train/... scalars."""
    return {"step": step, "epoch": step / durations.steps_per_epoch, **{f"train_{k}": v for k, v in train_stats.items()},
            "lr": lr, "effective_lr": effective_lr, "temperature": effective_lr / global_batch_size,
            "examples_per_second": examples_per_second, **norms}


def result_record(status: str, steps: int, durations: Durations, train_loss: float | None, objective, metrics: dict,
                  diverged_at: int | None, examples_per_second: float, wall_seconds: float, parameters: int, plan,
                  segments: list, **extra) -> dict:
    """result.json: status, steps, the final training loss, the test metric (named by `test_metric`), throughput,
    layout and segments; `extra` adds keys (packed runs: `packed_runs`)."""
    return {
        "status": status,
        "steps": steps,
        "total_steps": durations.total_steps,
        "epochs": steps / durations.steps_per_epoch,
        "train_loss": train_loss,
        **objective.train_summary(train_loss),
        "test_metric": objective.metric,
        "higher_is_better": objective.higher_is_better,
        objective.metric: metrics.get(objective.metric),
        **{k: v for k, v in metrics.items() if k != objective.metric},
        "diverged_at_step": diverged_at,
        "examples_per_second": examples_per_second,
        "wall_seconds": wall_seconds,
        "parameters": parameters,
        "layout": plan.as_dict(),
        "segments": segments,
        **extra,
    }


def write_final(run_dir: Path, model_state: dict, step: int, cfg: Config) -> None:
    """checkpoints/final.pt: the final weights (with batch-norm statistics) and the config that made them."""
    atomic_save_torch(Path(run_dir) / "checkpoints" / "final.pt", {"model": model_state, "step": step, "config": to_yaml(cfg)})


def write_result(run_dir: Path, result: dict) -> None:
    """result.json, the last file a finished run writes: its presence (completed / diverged) ends the run."""
    assert result["status"] in FINISHED, result["status"]
    atomic_write_json(Path(run_dir) / "result.json", result)


def summary(result: dict) -> str:
    """One line for the log: status, steps, test metric, final training loss, throughput."""
    rate = f"{result['examples_per_second']:.0f} examples/s"
    if result["status"] == DIVERGED:  # no test metric and no final window: say what happened instead
        return (f"done: diverged at step {result['diverged_at_step']} of {result['total_steps']} (training loss "
                f"non-finite or above divergence.max_loss): no test metric, no final train loss; {rate}")
    metric = result["test_metric"]
    parts = [f"{metric} {result[metric]:.4g}" if result.get(metric) is not None else f"no {metric}"]
    if result["train_loss"] is not None:
        parts.append(f"final train loss {round(result['train_loss'], 5)}")
    return f"done: {result['status']} after {result['steps']} steps; " + "; ".join(parts + [rate])

