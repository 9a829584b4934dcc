"""Checkpoints: `checkpoints/step-XXXXXXXX.pt`, written by rank 0 atomically, the last K kept.

Model and optimizer states are identical on every rank (DDP keeps replicas in step, and ghost-BN
running statistics are reduced over ranks), so rank 0 alone writes them and any world size can read them.
The data position is the step itself: batches are a function of (seed, step) only.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from harness.core.io import atomic_save_torch

PATTERN = re.compile(r"^step-(\d{8})\.pt$")


class Checkpointer:
    def __init__(self, directory: Path, keep: int, is_main: bool):
        self.directory = Path(directory)
        self.keep = keep
        self.is_main = is_main

    def paths(self) -> list[Path]:
        """Existing checkpoints, newest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := PATTERN.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, step: int, payload: dict) -> Path | None:
        if not self.is_main:
            return None
        path = self.directory / f"step-{step:08d}.pt"
        atomic_save_torch(path, payload)
        for old in self.paths()[self.keep:]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self) -> tuple[dict, Path] | None:
        """The newest readable checkpoint, on the CPU; an unreadable one (truncated, corrupt) is skipped with a
        warning. Loading onto the CPU, whatever the training device: the RNG states must stay CPU byte tensors
        (torch.set_rng_state refuses a CUDA tensor, so a requeued GPU job would crash-loop), and load_state_dict
        copies weights and momentum buffers onto the model's device anyway."""
        for path in self.paths():
            try:
                return torch.load(path, map_location="cpu", weights_only=True), path
            except Exception as e:  # noqa: BLE001 - any failure to read means: fall back to an older one
                print(f"harness: warning: checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
                      "falling back to the previous one", file=sys.stderr)
        return None


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore RNG states saved by `rng_state`, whatever device or dtype the loaded tensors ended up with."""
    torch.set_rng_state(_bytes(state["cpu"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_bytes(state["cuda"]))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """An RNG state as the CPU uint8 tensor torch's setters accept."""
    return t.detach().to(device="cpu", dtype=torch.uint8).contiguous()
