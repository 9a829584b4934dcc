"""Checkpoints: `checkpoints/step-XXXXXXXX.pt`, written by rank 0 atomically, the last K kept.

Model and optimizer states are identical on every rank (DDP keeps replicas in step, and ghost-BN
running statistics are reduced over ranks), so rank 0 alone writes them and any world size can read them.
The data position is the step itself: batches are a function of (seed, step) only.

Integrity. A checkpoint is the zip archive torch.save writes, and every record in it (the pickle, each tensor's
bytes) carries its CRC-32 in the archive's directory, computed by torch while it writes the record (forced on
here: torch.utils.serialization.config save.compute_crc32). The checksums are inside the file, so the one rename
that publishes a checkpoint publishes them with it: whenever a SIGKILL lands, a reader sees no checkpoint or a
checkpoint with its own checksums, never one with a missing or stale checksum (a sidecar file would need a second
rename, and a window between the two). torch.load does not check them, so `read` first reads every record through
zipfile, which does (zlib's CRC-32, about 4 GB/s here: 22 ms for a 100 MB checkpoint whose save takes 54 ms;
docs/faults.md). Checkpoints of earlier harness versions carry the same checksums and are verified alike.

A checkpoint that cannot be read, fails its checksum or does not fit the live run (keys, shapes, dtypes,
progress fields) is skipped with a one-line warning and the previous one is tried; when none is usable the run
stops with CheckpointError (exit 6) and deletes nothing, instead of silently starting again from step 0.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
import sys
import zipfile
from pathlib import Path
from typing import Callable

import torch
from torch.utils.serialization import config as serialization_config

from harness.core.errors import CheckpointError
from harness.core.io import atomic_save_torch
from harness.train.record import TrainState

PATTERN = re.compile(r"^step-(\d{8})\.pt$")
# atomic_write's temp names for step-*.pt and final.pt (older versions: mkstemp's 8 letters, digits or "_").
TEMP = re.compile(r"^\.(step-\d{8}|final)\.pt\.\w+\.tmp$")


class Unusable(Exception):
    """Why one checkpoint cannot be resumed from (the message goes into a one-line warning)."""


class Unfit(Unusable):
    """A checkpoint that loads but does not fit the live run (keys, shapes, dtypes, progress fields)."""


class Checkpointer:
    def __init__(self, directory: Path, keep: int, is_main: bool):
        self.directory = Path(directory)
        self.keep = keep
        self.is_main = is_main

    def paths(self) -> list[Path]:
        """Everything named like a checkpoint, newest first (a directory or FIFO so named included: `read` skips it)."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := PATTERN.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, step: int, payload: dict) -> Path | None:
        if not self.is_main:
            return None
        path = self.directory / f"step-{step:08d}.pt"
        if path.is_dir() and not path.is_symlink():  # os.replace cannot put a file over a directory (a link it can)
            raise CheckpointError(f"cannot write checkpoint {path}: a directory has that name; move it away "
                                  f"(mv {path} {path}.moved) and run the same command again to resume")
        with serialization_config.patch({"save.compute_crc32": True}):
            atomic_save_torch(path, payload)
        # Only regular files are rotated: a directory or FIFO named like a checkpoint is the user's, never deleted.
        for old in [p for p in self.paths() if p.is_file()][self.keep:]:
            old.unlink(missing_ok=True)
        return path

    def remove_stray_temps(self) -> list[Path]:
        """Delete the temp files of saves killed half-way (a full-size `.step-*.pt.*.tmp` each). Call it only from
        the process that holds the run (rank 0 of `harness train`, which locks the run directory, or a sweep
        task that holds the run's lock): a live writer's temp file would be deleted under it."""
        if not self.is_main or not self.directory.is_dir():
            return []
        stray = [p for p in self.directory.iterdir() if TEMP.match(p.name) and p.is_file()]
        for p in stray:
            p.unlink(missing_ok=True)
        if stray:
            print(f"harness: removed {len(stray)} temp file(s) left in {self.directory} by interrupted checkpoint "
                  f"saves: {', '.join(p.name for p in stray)}", file=sys.stderr)
        return stray

    def load_latest(self, restore: Callable[[dict, Path], None] | None = None) -> tuple[dict, Path] | None:
        """The newest usable checkpoint, on the CPU, after `restore(payload, path)` applied it to the live run
        (restore raises Unusable, or anything else, for one that does not fit: it is skipped like an unreadable
        one). None when there is no checkpoint; CheckpointError when there are some and none is usable.

        Loading onto the CPU, whatever the training device: the RNG states must stay CPU byte tensors
        (torch.set_rng_state refuses a CUDA tensor, so a requeued GPU job would crash-loop), and load_state_dict
        copies weights and momentum buffers onto the model's device anyway."""
        candidates = self.paths()
        for i, path in enumerate(candidates):
            try:
                payload = read(path)
                if restore is not None:
                    restore(payload, path)
                return payload, path
            except Exception as e:  # noqa: BLE001 - any failure to read or apply means: fall back to an older one
                warn_unusable(path, e, older=i + 1 < len(candidates))
        if candidates:
            raise none_usable(candidates)
        return None


def read(path: Path) -> dict:
    """A checkpoint's payload on the CPU, after checking every record's CRC-32; Unusable if it is not a regular
    file, is truncated, fails a checksum or does not load."""
    # O_NONBLOCK: a FIFO named like a checkpoint opens at once (and is refused below) instead of hanging.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise Unusable(f"not a regular file but a {_kind(mode)}")
    with os.fdopen(fd, "rb") as f:
        if not verify(f):
            print(f"harness: warning: checkpoint {path} has no checksums (written with torch's compute_crc32 off); "
                  "loading it unverified", file=sys.stderr)
        f.seek(0)
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError...
            raise Unusable(f"torch.load failed: {type(e).__name__}: {_first_line(e)}") from None


def verify(f) -> bool:
    """Check the CRC-32 of every record of the zip archive `f` by reading each record to its end (zipfile compares
    the CRC-32 there); False for an archive written without checksums (every CRC field 0): it cannot be verified."""
    try:
        with zipfile.ZipFile(f) as archive:
            records = archive.infolist()
            if records and all(r.CRC == 0 for r in records) and any(r.file_size for r in records):
                return False
            for r in records:
                with archive.open(r) as member:
                    while member.read(1 << 22):
                        pass
    except zipfile.BadZipFile as e:
        why = "checksum mismatch" if "CRC" in str(e) else "truncated or corrupt"
        raise Unusable(f"{why}: {_first_line(e)}") from None
    except (EOFError, ValueError, OSError, NotImplementedError) as e:
        raise Unusable(f"truncated or corrupt ({type(e).__name__}: {_first_line(e)})") from None
    return True


def check_payload(payload, model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> TrainState:
    """That a loaded checkpoint fits the live run, before any of it is applied: the trainer's payload keys, the
    model's state (every key, shape and dtype), the optimizer's (groups, parameters, buffer shapes) and the
    progress fields; returns its TrainState. Unusable says what does not fit."""
    if not isinstance(payload, dict):
        raise Unfit(f"it holds a {type(payload).__name__}, not a checkpoint")
    missing = [k for k in ("model", "optimizer", "rng", "state") if k not in payload]
    if missing:
        raise Unfit(f"it has no {', '.join(missing)}")
    check_tensors(payload["model"], model.state_dict(), "model")
    check_optimizer(payload["optimizer"], optimizer)
    rng = payload["rng"]
    if not isinstance(rng, dict) or not isinstance(rng.get("cpu"), torch.Tensor) or (
            rng["cpu"].numel() != torch.get_rng_state().numel()):
        raise Unfit("its RNG state is not a CPU generator state")
    if not all(isinstance(payload.get(k, {}), dict) for k in ("objective", "noise_scale")):
        raise Unfit("its objective or noise-scale state is not a mapping")
    return train_state(payload["state"], step_of(path))


def check_tensors(saved, live: dict[str, torch.Tensor], what: str) -> None:
    """`saved` has exactly `live`'s keys, each a tensor of the same shape and dtype."""
    if not isinstance(saved, dict):
        raise Unfit(f"its {what} state is a {type(saved).__name__}, not a state dict")
    missing, extra = [k for k in live if k not in saved], [k for k in saved if k not in live]
    if missing or extra:
        parts = [f"{label} {_few(keys)}" for label, keys in (("lacks", missing), ("has unexpected", extra)) if keys]
        raise Unfit(f"its {what} state {' and '.join(parts)}")
    for k, t in live.items():
        s = saved[k]
        if not isinstance(s, torch.Tensor) or s.shape != t.shape or s.dtype != t.dtype:
            got = f"{tuple(s.shape)} {s.dtype}" if isinstance(s, torch.Tensor) else type(s).__name__
            raise Unfit(f"{what} {k} is {got} where this run has {tuple(t.shape)} {t.dtype}")


def check_optimizer(saved, optimizer: torch.optim.Optimizer) -> None:
    """`saved` is a state dict of `optimizer`'s layout: its groups and parameter counts (torch checks these too),
    and every per-parameter buffer shaped like its parameter (torch does not: a wrong momentum buffer would load
    and crash the first step)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or not isinstance(
            saved.get("param_groups"), list):
        raise Unfit("its optimizer state is not an optimizer state dict")
    live = optimizer.param_groups
    sizes = [len(g.get("params", ())) if isinstance(g, dict) else None for g in saved["param_groups"]]
    if sizes != [len(g["params"]) for g in live]:
        raise Unfit(f"its optimizer has parameter groups of {sizes} parameters where this run's has "
                       f"{[len(g['params']) for g in live]}")
    for group, live_group in zip(saved["param_groups"], live):
        for index, p in zip(group["params"], live_group["params"]):
            for key, value in (saved["state"].get(index) or {}).items():
                if key != "step" and isinstance(value, torch.Tensor) and value.shape != p.shape:
                    raise Unfit(f"optimizer {key} of parameter {index} is {tuple(value.shape)} where the "
                                   f"parameter is {tuple(p.shape)}")


def train_state(saved, step: int) -> TrainState:
    """The TrainState of a checkpoint at `step`: exactly TrainState's fields, of their types, at that step."""
    if not isinstance(saved, dict):
        raise Unfit(f"its progress state is a {type(saved).__name__}, not a mapping")
    names = [f.name for f in dataclasses.fields(TrainState)]
    missing, extra = [k for k in names if k not in saved], [k for k in saved if k not in names]
    if missing or extra:
        parts = [f"{label} {_few(keys)}" for label, keys in (("lacks", missing), ("has unexpected", extra)) if keys]
        raise Unfit(f"its progress state {' and '.join(parts)} (fields: {', '.join(names)})")
    state = TrainState(**saved)
    bad = [f"{k} {getattr(state, k)!r} is not a whole number >= 0" for k in ("step", "tail_steps")
           if type(getattr(state, k)) is not int or getattr(state, k) < 0]
    bad += [f"{k} {getattr(state, k)!r} is not a finite number" for k in ("train_seconds", "wall_seconds",
            "tail_loss_sum") if type(getattr(state, k)) not in (int, float) or not math.isfinite(getattr(state, k))]
    bad += [] if isinstance(state.segments, list) else [f"segments is a {type(state.segments).__name__}, not a list"]
    if not bad and state.step != step:
        bad.append(f"step {state.step} is not the step of its file name ({step})")
    if not bad and state.tail_steps > step:
        bad.append(f"tail_steps {state.tail_steps} exceeds its step {step}")
    if bad:
        raise Unfit(f"its progress state is wrong: {'; '.join(bad)}")
    return state


def step_of(path: Path) -> int:
    return int(PATTERN.match(path.name).group(1))


def warn_unusable(path: Path, error: BaseException, older: bool) -> None:
    """One line on stderr: which checkpoint, why, and what happens next."""
    why = str(error) if isinstance(error, Unusable) else f"{type(error).__name__}: {_first_line(error)}"
    what = "does not fit this run" if isinstance(error, Unfit) else "is unreadable"
    then = "falling back to the previous one" if older else "no older checkpoint to fall back to"
    print(f"harness: warning: checkpoint {path} {what} ({why}); {then}", file=sys.stderr)


def none_usable(paths: list[Path]) -> CheckpointError:
    """Exit 6, naming the files and the fix; nothing is deleted (they may be needed to find out what happened)."""
    dirs = list(dict.fromkeys(p.parent for p in paths))
    listing = "; ".join(f"{d}: {', '.join(p.name for p in paths if p.parent == d)}" for d in dirs)
    moves = " && ".join(f"mv {d} {d}.unusable" for d in dirs)
    return CheckpointError(f"no usable checkpoint ({listing}; see the warnings above); nothing was deleted. Restore "
                           f"a good copy to resume, or move them aside to train from step 0: {moves}")


def _kind(mode: int) -> str:
    return ("directory" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
            else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file")


def _few(keys: list) -> str:
    return (", ".join(map(str, keys[:3])) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")) or "none"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


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
