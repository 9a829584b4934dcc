"""From (nodes, processes per node, launcher) to the exact command lines that start `harness train`.

Where the command runs decides its shape:

    outside SLURM, 1 node     PY -m torch.distributed.run --standalone --nproc-per-node P -m harness train ...
    outside SLURM, N nodes    the same torchrun line on every node, with --nnodes N and a c10d rendezvous at
                              --rdzv-endpoint (required: there is no way to guess the head node here)
    inside a SLURM job        srun --nodes N --ntasks-per-node 1 ... PY -m torch.distributed.run --nnodes N
                              --nproc-per-node P --rdzv-backend c10d --rdzv-endpoint HEAD:PORT
                              --rdzv-id $SLURM_JOB_ID -m harness train ...
    --launcher deepspeed      PY -m deepspeed.launcher.runner --num_gpus P ... --module harness train ...
                              (one node; inside SLURM wrapped in srun like torchrun)

The head node is the first name of `scontrol show hostnames "$SLURM_JOB_NODELIST"`, reached at the address
SLURM itself uses for it (NodeAddr from `scontrol show node`). If it cannot be worked out the launch is refused
(LaunchError) instead of falling back to localhost, where every node would form a world of its own.

Multi-node DeepSpeed runs under torchrun (`backend: deepspeed` is an engine, torchrun a launcher): the
`deepspeed` launcher reaches other nodes through pdsh/ssh and a hostfile, and processes it starts that way live
outside the SLURM job step, so SLURM can neither signal nor kill nor account for them. torchrun started by srun
needs neither ssh nor a hostfile, keeps every process inside the step, and gives the same c10d rendezvous and
elastic restarts (--max-restarts) as DDP runs.
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from harness.core.errors import LaunchError

LAUNCHERS = ("torchrun", "deepspeed")
# Rendezvous store timeouts (seconds). torchrun's c10d default read_timeout (60 s) fails a node that starts a
# minute after the head, which on a busy filesystem is common (pytorch#69197, #107021).
JOIN_TIMEOUT = 900
READ_TIMEOUT = 300
DEFAULT_PORT = 29400  # torchrun's c10d default


@dataclass(frozen=True)
class Layout:
    """How many processes where, and how they find each other."""

    launcher: str  # torchrun | deepspeed
    nnodes: int
    nproc_per_node: int
    rdzv_endpoint: str | None  # HOST:PORT of the c10d store (multi-node); None: single node, local store
    rdzv_id: str  # the SLURM job id inside a job, so two jobs on one endpoint never mix
    port: int  # the rendezvous/master port
    slurm_job: str | None  # SLURM job id when inside a job
    nproc_source: str  # where nproc_per_node came from (for the log)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def describe(self) -> str:
        where = f"SLURM job {self.slurm_job}" if self.slurm_job else "no SLURM job"
        rdzv = f"c10d rendezvous at {self.rdzv_endpoint} (id {self.rdzv_id})" if self.rdzv_endpoint else "single node"
        return (f"{self.launcher}: {self.nnodes} node(s) x {self.nproc_per_node} process(es) "
                f"({self.nproc_source}) = world size {self.world_size}; {rdzv}; {where}")


Runner = Callable[[Sequence[str]], str]


def run_scontrol(args: Sequence[str]) -> str:
    """stdout of `scontrol ARGS`; LaunchError naming the failure (so nothing falls back silently)."""
    try:
        proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise LaunchError(f"cannot work out the head node: scontrol is not on PATH (needed for `scontrol "
                          f"{' '.join(args)}`); run inside a SLURM job with SLURM's client tools, or pass "
                          "--rdzv-endpoint HOST:PORT") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"cannot work out the head node: `scontrol {' '.join(args)}` timed out; "
                          "pass --rdzv-endpoint HOST:PORT") from None
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()
        raise LaunchError(f"cannot work out the head node: `scontrol {' '.join(args)}` failed "
                          f"({why[-1] if why else f'exit {proc.returncode}'}); pass --rdzv-endpoint HOST:PORT")
    return proc.stdout


def head_node(nodelist: str, scontrol: Runner = run_scontrol) -> str:
    """The first host of a SLURM node list such as `gpu[003-004,010]`, expanded by SLURM itself."""
    hosts = scontrol(["show", "hostnames", nodelist]).split()
    if not hosts:
        raise LaunchError(f"cannot work out the head node: `scontrol show hostnames {nodelist}` printed nothing; "
                          "pass --rdzv-endpoint HOST:PORT")
    return hosts[0]


def node_address(node: str, scontrol: Runner = run_scontrol, resolve: Callable | None = None) -> str:
    """The address other nodes reach `node` at: its NodeAddr (what slurmctld uses; the name itself on most
    clusters), checked to resolve."""
    try:
        text = scontrol(["show", "node", "-o", node])
        found = re.search(r"\bNodeAddr=(\S+)", text)
        addr = found.group(1) if found and found.group(1) not in ("", "(null)") else node
    except LaunchError:
        addr = node  # scontrol may be restricted to some node queries; the name is SLURM's default NodeAddr
    try:
        (resolve or socket.getaddrinfo)(addr, None)
    except (socket.gaierror, UnicodeError) as e:
        raise LaunchError(f"cannot work out the head node: its address {addr!r} (node {node}) does not resolve "
                          f"({e}); pass --rdzv-endpoint HOST:PORT") from None
    return addr


def slurm_port(job_id: str) -> int:
    """A rendezvous port fixed by the job id: the same on every node, different for jobs sharing a node,
    below Linux's ephemeral range (32768+) so no outgoing connection holds it."""
    return 20000 + int(re.sub(r"\D", "", job_id) or "0") % 10000


def gpus_from_slurm(env: Mapping[str, str]) -> int | None:
    """GPUs SLURM gave this node: SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE ("4", "a100:4", "gpu:a100:4")."""
    on_node = env.get("SLURM_GPUS_ON_NODE", "").strip()
    if on_node.isdigit():
        return int(on_node)
    per_node = env.get("SLURM_GPUS_PER_NODE", "").strip()
    if per_node:
        last = per_node.split(",")[0].split("(")[0].split(":")[-1]
        if last.isdigit():
            return int(last)
    return None


def _positive(value, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise LaunchError(f"{what} must be a positive integer, got {value!r}")
    return n


def processes_per_node(env: Mapping[str, str], explicit: int | None, local_gpus: Callable[[], int]) -> tuple[int, str]:
    """Explicit setting, else the GPUs SLURM gave each node (inside a job) or the visible GPUs, else 1."""
    if explicit is not None:
        return explicit, "explicit"
    if env.get("SLURM_JOB_ID"):
        gpus = gpus_from_slurm(env)
        return (gpus, "GPUs SLURM gave each node") if gpus else (1, "CPU-only node: 1")
    gpus = local_gpus()
    return (gpus, "visible GPUs") if gpus else (1, "no GPU: 1")


def resolve_layout(env: Mapping[str, str], *, launcher: str = "torchrun", nodes: int | None = None,
                   nproc_per_node: int | None = None, rdzv_endpoint: str | None = None, rdzv_id: str | None = None,
                   port: int | None = None, scontrol: Runner = run_scontrol,
                   local_gpus: Callable[[], int] = lambda: 0, free_port: Callable[[], int] | None = None,
                   resolve: Callable | None = None) -> Layout:
    """Work out the layout from explicit settings first, then the SLURM environment, then this machine."""
    if launcher not in LAUNCHERS:
        raise LaunchError(f"--launcher {launcher!r} is not one of: {', '.join(LAUNCHERS)}")
    nodes = _positive(nodes, "--nodes")
    port = _positive(port, "--rdzv-port (HARNESS_RDZV_PORT)")
    job = env.get("SLURM_JOB_ID") or None
    nnodes = nodes or 1
    if job:
        nnodes = _positive(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or "1", "SLURM_JOB_NUM_NODES")
        if nodes is not None and nodes != nnodes:
            raise LaunchError(f"--nodes {nodes} but SLURM job {job} has {nnodes} node(s); "
                              f"submit with sbatch --nodes={nodes}, or drop --nodes")
    nproc, source = processes_per_node(env, _positive(nproc_per_node, "--nproc-per-node (HARNESS_NPROC_PER_NODE)"),
                                       local_gpus)
    if launcher == "deepspeed" and nnodes > 1:
        raise LaunchError(
            f"the deepspeed launcher reaches other nodes through pdsh/ssh and a hostfile, outside SLURM's control; "
            f"for {nnodes} nodes use --launcher torchrun (the default): backend: deepspeed runs under torchrun")

    host = None
    if rdzv_endpoint:
        host, _, p = rdzv_endpoint.rpartition(":") if ":" in rdzv_endpoint else (rdzv_endpoint, "", "")
        if not host:
            raise LaunchError(f"--rdzv-endpoint {rdzv_endpoint!r}: expected HOST or HOST:PORT")
        port = _positive(p, f"the port of --rdzv-endpoint {rdzv_endpoint!r}") or port
    if port is None:
        # Every node must compute the same port: from the job id in SLURM, torchrun's c10d default across
        # nodes outside it; a single node may take any free one.
        port = slurm_port(job) if job else DEFAULT_PORT if nnodes > 1 else (free_port or _free_port)()
    endpoint = None
    if nnodes > 1:
        if host is None and not job:
            raise LaunchError(f"cannot work out the head node for {nnodes} nodes outside a SLURM job; pass "
                              "--rdzv-endpoint HOST:PORT (the same on every node; HOST is the first node)")
        if host is None:
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise LaunchError(f"cannot work out the head node: SLURM job {job} but SLURM_JOB_NODELIST is unset; "
                                  "pass --rdzv-endpoint HOST:PORT")
            host = node_address(head_node(nodelist, scontrol), scontrol, resolve)
        endpoint = f"{host}:{port}"
    # SLURM_JOB_ID is unique per array task too, so concurrent tasks never share a rendezvous.
    return Layout(launcher, nnodes, nproc, endpoint, rdzv_id or job or "harness", port, job, source)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_command(layout: Layout, python: str, train_args: Sequence[str], max_restarts: int = 0,
                   visible_devices: str | None = None) -> list[str]:
    """The per-node launcher line (torchrun or deepspeed) that starts the training processes."""
    train = ["-m", "harness", "train", *train_args]
    if layout.launcher == "deepspeed":
        # The deepspeed launcher drops CUDA_VISIBLE_DEVICES when given --num_gpus and would then use GPUs 0..P-1
        # of the node, not the ones SLURM assigned: name the visible ones with --include instead.
        ids = [d for d in (visible_devices or "").split(",") if d.strip()]
        if ids and len(ids) < layout.nproc_per_node:
            raise LaunchError(f"{layout.nproc_per_node} processes per node but only {len(ids)} visible GPUs "
                              f"(CUDA_VISIBLE_DEVICES={visible_devices}); lower --nproc-per-node")
        devices = f"--include=localhost:{','.join(ids[:layout.nproc_per_node])}" if ids else f"--num_gpus={layout.nproc_per_node}"
        # --no_local_rank: the harness reads LOCAL_RANK from the environment, not from a --local_rank argument.
        return [python, "-m", "deepspeed.launcher.runner", devices, f"--master_port={layout.port}", "--no_local_rank",
                "--module", "harness", "train", *train_args]
    cmd = [python, "-m", "torch.distributed.run", f"--nnodes={layout.nnodes}", f"--nproc-per-node={layout.nproc_per_node}"]
    if layout.rdzv_endpoint is None:
        cmd += ["--standalone"]
    else:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={layout.rdzv_endpoint}", f"--rdzv-id={layout.rdzv_id}",
                f"--rdzv-conf=join_timeout={JOIN_TIMEOUT},read_timeout={READ_TIMEOUT}"]
    if max_restarts:
        cmd += [f"--max-restarts={max_restarts}"]
    return cmd + train


def srun_prefix(layout: Layout, env: Mapping[str, str]) -> list[str]:
    """One task per node (it forks the workers); a failure on one node ends the step on all of them."""
    cmd = ["srun", f"--nodes={layout.nnodes}", f"--ntasks={layout.nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    # Slurm 22.05-23.02 srun no longer reads --cpus-per-task from sbatch: without this the task (and every
    # worker and data-loading thread it forks) could be bound to one CPU.
    if env.get("SLURM_CPUS_PER_TASK"):
        cmd.append(f"--cpus-per-task={env['SLURM_CPUS_PER_TASK']}")
    return cmd


def build_commands(layout: Layout, python: str, train_args: Sequence[str], env: Mapping[str, str],
                   max_restarts: int = 0) -> list[list[str]]:
    """The exact commands to run: one inside SLURM (srun starts the launcher on every node); outside SLURM the
    one line every node runs."""
    worker = worker_command(layout, python, train_args, max_restarts, env.get("CUDA_VISIBLE_DEVICES"))
    if layout.slurm_job:
        return [srun_prefix(layout, env) + worker]
    return [worker]


def quote(cmd: Sequence[str]) -> str:
    return shlex.join(list(map(str, cmd)))


def local_gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA means no GPU
        return 0
