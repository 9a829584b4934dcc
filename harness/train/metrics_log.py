"""The metrics log of a run: metrics.jsonl (one JSON object per record) and the same scalars as TensorBoard
events under tb/, written by rank 0."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from harness.core.io import atomic_write_text, names_path


class MetricsLog:
    """metrics.jsonl (one JSON object per record) and TensorBoard events under tb/; rank 0 only.

    On resume from step s, records after s (logged before the interruption) are dropped from
    metrics.jsonl and purged from TensorBoard, so both read as one uninterrupted run.
    """

    # metrics key -> TensorBoard tag
    TAGS = {
        "train_loss": "train/loss", "train_accuracy": "train/accuracy", "lr": "train/lr",
        "effective_lr": "train/effective_lr", "temperature": "train/temperature",
        "examples_per_second": "train/examples_per_second", "grad_norm": "train/grad_norm",
        "param_norm": "train/param_norm", "update_norm": "train/update_norm", "b_simple": "train/b_simple",
        "noise_trace": "train/noise_trace", "noise_grad_sq": "train/noise_grad_sq",
    }

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step and self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= resume_step]
            self._keep_unreadable([line for line in lines if _step_of(line) is None])
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif not resume_step:
            self.path.unlink(missing_ok=True)
        self.file = open(self.path, "a")
        self.tb_dir = Path(run_dir) / "tb"
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            with names_path(self.tb_dir):
                self.writer = SummaryWriter(str(self.tb_dir), purge_step=resume_step + 1 if resume_step else None)

    def _keep_unreadable(self, lines: list[str]) -> None:
        """Lines that are not records (cut by a kill mid-write, a hand edit, a step of Infinity or NaN) leave
        metrics.jsonl on resume but are not lost: they are appended to metrics.jsonl.unreadable."""
        if not lines:
            return
        aside = self.path.with_name(self.path.name + ".unreadable")
        with names_path(aside), open(aside, "a") as f:
            f.write("".join(line + "\n" for line in lines))
        print(f"harness: warning: {len(lines)} line(s) of {self.path} are not records with a finite step; "
              f"moved to {aside}", file=sys.stderr)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with names_path(self.path):  # a full disk fails write() or flush() with no file name
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.writer is not None:
            step = record["step"]
            with names_path(self.tb_dir):  # the event file's writer thread re-raises its OSError here
                for key, value in record.items():
                    if key == "step" or not isinstance(value, (int, float)):
                        continue
                    tag = self.TAGS.get(key) or _tag(key)
                    self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        with names_path(self.path):
            self.file.close()
        if self.writer is not None:
            with names_path(self.tb_dir):
                self.writer.close()


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line that is not a record (cut by a kill, hand-edited) or whose
    step is not a finite number (Python's json reads `Infinity` and `NaN`): such lines are dropped on resume."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
        return None
    return int(step)


def _tag(key: str) -> str:
    """test_accuracy -> test/accuracy, train_set_loss -> train_set/loss; anything else as it is."""
    for prefix in ("test_", "train_set_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return key
