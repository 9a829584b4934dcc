"""Process-group set-up from the launcher's environment (torchrun, the deepspeed launcher, or none).

torchrun and the deepspeed launcher both export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT.
A plain `harness train` is world size 1 and creates no process group at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from harness.core.configlib import positive
from harness.core.errors import ConfigError


@dataclass
class DistributedConfig:
    """How long a rank waits for the others (a layout key: it never changes the trajectory)."""

    # A collective of the steady state (a training step, a stop-flag exchange, an evaluation) that waits longer
    # than this for another rank fails the job with one line: a rank that froze (SIGSTOP, a hung GPU, a node
    # that stopped answering) costs this long instead of torch's 30 minutes. Raise it when a step, an
    # evaluation or rank 0 saving a checkpoint can legitimately take longer.
    timeout_minutes: float = positive(10.0)
    # The same for the start of a run: rendezvous, process-group creation, and everything up to the end of the
    # first step (torch.compile, cuDNN autotuning, DeepSpeed initialization, data readers opening shards).
    startup_timeout_minutes: float = positive(30.0)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


def setup(device: str = "auto", timeout_minutes: float = 30.0) -> DistEnv:
    """The process group (world size > 1), created with the start-up timeout `timeout_minutes`."""
    world = world_size_from_env()
    rank = rank_from_env()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key device: cuda was asked for but no GPU is visible; set device: auto or cpu")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        timeout = timedelta(minutes=timeout_minutes)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        # After an elastic restart (torchrun --max-restarts) the agent's store still holds the previous
        # attempt's keys, and gloo/nccl would connect to the dead workers' addresses ("Connection refused",
        # pytorch#167288). A prefix per attempt keeps each restart's rendezvous keys apart.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", store=dist.PrefixStore(f"harness/attempt-{attempt}", store),
            rank=rank, world_size=world, timeout=timeout, device_id=dev if use_cuda else None,
        )
    return DistEnv(rank, world, local, dev)


def ensure_process_group(device: torch.device) -> None:
    """A one-process group when the launcher started none (W = 1), for libraries that insist on one (DeepSpeed).
    An in-memory store: no address, no port, nothing another job could collide with."""
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1, device_id=device if device.type == "cuda" else None)


# The process groups this module created besides the default one (ghost BN, step flags): set_timeout covers them.
_groups: list = []


def set_timeout(minutes: float) -> None:
    """The timeout of every later collective of the default group and of the groups created here.

    Called after the first step: start-up may need long waits, the steady state should notice a lost rank soon.
    gloo applies it to each operation; NCCL's watchdog aborts a collective that runs past it
    (TORCH_NCCL_ASYNC_ERROR_HANDLING) and the process exits."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for group in (None, *_groups):
            dist.set_timeout(timedelta(minutes=minutes), group)


def is_timeout(error: BaseException) -> bool:
    """Whether a collective failed because a peer did not answer in time (gloo: "Timed out waiting ... for recv",
    NCCL: "Watchdog caught collective operation timeout"), or because a peer's connection closed."""
    text = str(error).lower()
    return isinstance(error, (RuntimeError, dist.DistError)) and any(
        s in text for s in ("timed out", "timeout", "connection closed by peer", "connection reset by peer"))


def teardown() -> None:
    _groups.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def ghost_bn_group(ranks_per_group: int):
    """The process group of this rank's ghost-BN group when a group of G examples spans `ranks_per_group`
    consecutive ranks of a micro-step (m < G, see harness.recipe.batch_plan); None when groups are local (no communication).

    Every rank must call this once, at start, with the same value: torch creates ALL the subgroups
    [0, k), [k, 2k), ... on every rank, in that order, and returns the one holding this rank.
    """
    if ranks_per_group <= 1 or not (dist.is_available() and dist.is_initialized()):
        return None
    group, _ = dist.new_subgroups(group_size=ranks_per_group)
    _groups.append(group)
    return group


class StepFlags:
    """Flags every rank must agree on at a step boundary (a stop request on any rank, a time-based checkpoint on
    rank 0's clock), exchanged without touching the training device: reading a device all-reduce back to the
    host would make every step wait for the GPU.

    At world size 1 the flags are used as they are. Across ranks they travel in a CPU all-reduce over a gloo group
    of their own: the host waits for the other hosts (a network round trip, tens to hundreds of microseconds),
    never for its device, which keeps running the kernels already queued.
    """

    def __init__(self, world_size: int):
        self.group = dist.new_group(backend="gloo") if world_size > 1 else None
        if self.group is not None:
            _groups.append(self.group)

    def exchange(self, stop: bool, checkpoint: bool) -> tuple[bool, bool]:
        """This step's (stop, checkpoint), agreed over the ranks: True if any rank raised it."""
        if self.group is None:
            return stop, checkpoint
        flags = torch.tensor([int(stop), int(checkpoint)], dtype=torch.int32)
        dist.all_reduce(flags, group=self.group)
        return bool(flags[0] > 0), bool(flags[1] > 0)
