"""A real SLURM cluster on this one machine, for end-to-end tests of the sbatch scripts.

Debian's slurm-wlm is built with --enable-multiple-slurmd, so one `slurmd -N nodeX` per emulated node
runs beside one slurmctld; munged authenticates them. Everything (munge key and socket, slurm.conf,
state, spool, logs) lives in a private temp dir, every daemon gets free ports, and the cluster has
its own name, so several test sessions (several worktrees) can each run one at the same time and
none touches the machine's own /etc/slurm or /run/munge. `stop()` ends only the processes started here.

    with SlurmCluster(nodes=2) as cluster:   # or the session fixture `slurm_cluster` (tests/conftest.py)
        job = cluster.sbatch("slurm/cifar10_wrn16_4.sh", "--set", "model.depth=10",
                             sbatch_args=["--nodes=2", "--gpus-per-node=1"], env=..., cwd=...)
        info = cluster.wait(job)              # {"JobState": "COMPLETED", "ExitCode": "0:0", "NodeList": ..., "Restarts": ...}
        print(cluster.output(job))            # the job's stdout file
        cluster.step_nodes(job)               # {"node1", "node2"}: where its first srun ran tasks
        cluster.signal(job, "USR1")           # as --signal=B:USR1@T does: the batch shell only
        cluster.jobs(array_id)                # one record per array task; wait() waits for all of them
        cluster.env / cluster.client_env(X=1) # os.environ + SLURM_CONF, for sbatch/srun/scontrol you run yourself

Each node declares 32 CPUs and 4 GPUs (gres backed by plain files; CUDA sees none), so scripts with realistic
#SBATCH defaults submit unchanged. Job ids start at a random number per cluster (FirstJobId) so concurrent clusters'
jobs (and the rendezvous ports and ids the launcher derives from them) differ. wait() lifts SLURM's ~2 minute hold
on a requeued job. HARNESS_KEEP_SLURM=1 keeps the temp dir (configs, daemon logs, job logs) after stop().

Needs root (slurmd launches jobs as the submitting user) and, on a bare machine, apt-get: the
packages are installed here if missing, so CI needs no extra step.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "REVOKED", "SPECIAL_EXIT"}


class SlurmError(RuntimeError):
    pass


def ensure_installed(timeout: float = 900) -> None:
    """Install Debian's slurm-wlm and munge with apt-get if their daemons are missing (we are root in CI)."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise SlurmError("slurm-wlm/munge are not installed and this is not root: "
                         "run `apt-get install slurm-wlm munge` as root, or run the tests as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=600"]  # another session may be installing at the same time
    for cmd in (["apt-get", *lock, "update", "-qq"],
                ["apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    """munged + slurmctld + one slurmd per node, all on 127.0.0.1, configured in a private temp dir.

    nodes:         number of emulated nodes (node1, node2, ...)
    cpus_per_node: CPUs each node declares (more than the machine has is fine: no binding, no cgroups)
    gpus_per_node: GPUs each node declares as gres, backed by plain files (CUDA sees none), so scripts with
                   `#SBATCH --gpus-per-node=4` submit unchanged; `sbatch --gpus-per-node=1` then gives
                   SLURM_GPUS_ON_NODE=1, i.e. one training process per node. 0: no gres at all.
    config:        more slurm.conf settings, e.g. {"MaxArraySize": 5} (array indices 0..4 only, as a site
                   with a small limit has); a key given here replaces the default line of the same key.
    """

    def __init__(self, nodes: int = 2, cpus_per_node: int = 32, gpus_per_node: int = 4, memory_mb: int = 8000,
                 config: dict | None = None):
        self.nodes = [f"node{i + 1}" for i in range(nodes)]
        self.cpus_per_node = cpus_per_node
        self.gpus_per_node = gpus_per_node
        self.memory_mb = memory_mb
        self.extra_config = dict(config or {})
        self.root: Path | None = None
        self.conf: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}

    # ---- lifecycle -----------------------------------------------------------------------------------

    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        ensure_installed()
        if os.geteuid() != 0:
            raise SlurmError("the SLURM test cluster needs root (slurmd starts jobs as the submitting user)")
        # Not under pytest's tmp (mode 0700): munged insists that everyone may traverse its socket's dir.
        self.root = Path(tempfile.mkdtemp(prefix="harness-slurm-"))
        self.root.chmod(0o755)
        for sub in ("munge", "state", "log", "run", "spool", "jobs"):
            (self.root / sub).mkdir(mode=0o755)
        (self.root / "key").mkdir(mode=0o700)
        try:
            self._start_munge()
            self._write_config()
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)])
            for node in self.nodes:
                (self.root / "spool" / node).mkdir(mode=0o755)
                self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _start_munge(self) -> None:
        key = self.root / "key" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._spawn("munged", ["munged", "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={self.root / 'run' / 'munged.pid'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}",
                               f"--seed-file={self.root / 'run' / 'munged.seed'}"])
        deadline = time.time() + 20
        while not self.munge_socket.exists():
            self._check_alive()
            if time.time() > deadline:
                raise SlurmError(f"munged did not create {self.munge_socket}:\n{self.logs()}")
            time.sleep(0.1)

    def _write_config(self) -> None:
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        host = socket.gethostname().split(".")[0]
        r = self.root
        gres = f" Gres=gpu:{self.gpus_per_node}" if self.gpus_per_node else ""
        lines = [
            f"ClusterName=harness{ctld_port}",
            # Job ids (and so the launcher's rendezvous ports and ids) differ between clusters running at once.
            f"FirstJobId={random.randrange(10_000, 1_000_000)}",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_socket}",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'run' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
            # No cgroups in a container: track processes by parent pid, bind nothing.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none", "MpiDefault=none",
            "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            # Nodes may declare more CPUs than the machine has; a slurmd restart returns a node to service.
            "SlurmdParameters=config_overrides", "ReturnToService=2",
            # Finished jobs stay visible to `scontrol show job` (no accounting database here).
            "MinJobAge=3600", "KillWait=10", "InactiveLimit=0", "SlurmctldTimeout=30", "SlurmdTimeout=60",
            "JobRequeue=1", "MailProg=/bin/true",
        ]
        if self.extra_config:
            lines = [line for line in lines if line.split("=", 1)[0] not in self.extra_config]
            lines += [f"{key}={value}" for key, value in self.extra_config.items()]
        if self.gpus_per_node:
            # slurmd counts a GPU per device file; plain files stand in for /dev/nvidiaN (CUDA still sees none).
            (r / "dev").mkdir(mode=0o755)
            for i in range(self.gpus_per_node):
                (r / "dev" / f"gpu{i}").touch()
            lines.append("GresTypes=gpu")
            (r / "gres.conf").write_text(f"Name=gpu File={r / 'dev'}/gpu[0-{self.gpus_per_node - 1}]\n")
        for node, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus_per_node} RealMemory={self.memory_mb}{gres} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf = r / "slurm.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.console", "ab")
        # Own session: a Ctrl-C in the test terminal reaches pytest, which then stops us in order.
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self._daemon_env(),
                                            start_new_session=True)
        out.close()

    def _daemon_env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf) if self.conf else ""}

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise SlurmError(f"{name} exited with {proc.returncode} during start-up:\n{self.logs()}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while True:
            self._check_alive()
            states = self.node_states()
            if states and all(s.lower() == "idle" for s in states.values()):
                return
            if time.time() > deadline:
                raise SlurmError(f"nodes not idle after {timeout:.0f} s: {states}\n{self.logs()}")
            time.sleep(0.3)

    def stop(self, timeout: float = 30) -> None:
        """Cancel this cluster's jobs, then stop the daemons started here (by pid), then delete the temp dir."""
        if self.conf is not None and "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user", "root"], env=self.env, capture_output=True, timeout=30)
            deadline = time.time() + timeout
            while time.time() < deadline and self.squeue():
                time.sleep(0.5)
        # slurmds first (they end their job steps), then the controller, then munged.
        order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()
        if self.root is not None and not os.environ.get("HARNESS_KEEP_SLURM"):
            shutil.rmtree(self.root, ignore_errors=True)

    # ---- client helpers ------------------------------------------------------------------------------

    @property
    def env(self) -> dict:
        """os.environ plus SLURM_CONF: pass it to any sbatch/srun/scontrol you run yourself."""
        return self.client_env()

    def client_env(self, **extra) -> dict:
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, *cmd, check: bool = True, env: dict | None = None, timeout: float = 60, cwd=None) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(c) for c in cmd], env=env or self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(map(str, cmd))} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def sbatch(self, script, *args, sbatch_args=(), env: dict | None = None, cwd=None) -> str:
        """Submit `script ARGS` with extra sbatch options; return the job id. The job's stdout goes to
        ROOT/jobs/<name>-<id>.out unless sbatch_args set --output. `env` is the environment sbatch (and so the
        job, --export=ALL) sees; default: this process's plus SLURM_CONF."""
        opts = list(map(str, sbatch_args))
        if not any(o.startswith(("--output", "-o")) for o in opts):
            opts.append(f"--output={self.root / 'jobs' / '%x-%j.out'}")
        proc = self.run("sbatch", "--parsable", *opts, script, *args, env=env, cwd=cwd)
        return proc.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict]:
        """`scontrol show job -o JOB` as dicts (JobState, ExitCode, NodeList, StdOut, Restarts, ArrayTaskId, ...):
        one per job, so one per array task (tasks not started yet share one record) for an array's id."""
        proc = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if proc.returncode != 0:
            raise SlurmError(f"scontrol show job {job_id}: {proc.stderr.strip()}")
        return [dict(re.findall(r"(\w[\w:/]*)=(\S*)", line)) for line in proc.stdout.strip().splitlines() if line.strip()]

    def job(self, job_id: str) -> dict:
        """The first record of `jobs(job_id)`: the job itself (for an array id, one of its tasks)."""
        return self.jobs(job_id)[0]

    def wait(self, job_id: str, timeout: float = 600, poll: float = 1.0, release_requeued: bool = True) -> dict:
        """Block until the job (every task of an array) reaches a terminal state; return its `job()` record
        (`jobs()` has every task's). Raises SlurmError
        (with the job's output and the daemon logs) on timeout.

        SLURM holds a requeued batch job for about 2 minutes (Reason=BeginTime) before it may start again;
        with release_requeued (default) that hold is lifted at once (`scontrol update StartTime=now`), so a
        requeue-and-resume test does not sleep. Restarts in the returned record counts the requeues."""
        deadline = time.time() + timeout
        while True:
            records = self.jobs(job_id)
            info = records[0]
            if all(r.get("JobState") in TERMINAL_STATES for r in records):  # every task of an array
                return info
            for r in records:
                if (release_requeued and r.get("JobState") == "PENDING" and r.get("Reason") == "BeginTime"
                        and r.get("Restarts", "0") != "0"):
                    self.run("scontrol", "update", f"JobId={r['JobId']}", "StartTime=now", check=False)
            if time.time() > deadline:
                self.run("scancel", job_id, check=False)
                raise SlurmError(f"job {job_id} not finished after {timeout:.0f} s (state {info.get('JobState')}):\n"
                                 f"{self.output(job_id)[-4000:]}\n{self.logs()}")
            time.sleep(poll)

    def output(self, job_id: str) -> str:
        """The job's stdout file (empty if not written yet); for an array, one task's (each record of `jobs()`
        names its own StdOut)."""
        path = self.job(job_id).get("StdOut")
        return Path(path).read_text(errors="replace") if path and Path(path).exists() else ""

    def squeue(self) -> list[dict]:
        """Jobs in the queue (pending/running): [{"id", "name", "state", "nodes"}]."""
        proc = self.run("squeue", "-h", "-o", "%i|%j|%T|%N", check=False)
        rows = [line.split("|") for line in proc.stdout.strip().splitlines() if line.strip()]
        return [{"id": r[0], "name": r[1], "state": r[2], "nodes": r[3]} for r in rows if len(r) == 4]

    def signal(self, job_id: str, sig: str = "USR1", batch_only: bool = True) -> None:
        """Send a signal as SLURM's --signal=B:SIG@T would (batch shell only), or to all job steps."""
        self.run("scancel", f"--signal={sig}", *(["--batch"] if batch_only else []), job_id)

    def step_nodes(self, job_id: str, step: str = "0") -> set[str]:
        """The nodes whose slurmd launched tasks of step JOB.STEP (read from the slurmd logs: this cluster has no
        accounting database). Step 0 is the job's first srun."""
        pattern = f"launch task StepId={job_id}.{step} "
        return {node for node in self.nodes
                if pattern in (self.root / "log" / f"slurmd-{node}.log").read_text(errors="replace")}

    def node_states(self) -> dict[str, str]:
        proc = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        return dict(line.split() for line in proc.stdout.strip().splitlines() if len(line.split()) == 2)

    def logs(self, tail: int = 3000) -> str:
        """The tails of the daemon logs (for failure messages)."""
        if self.root is None:
            return ""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace")
            if text.strip():
                parts.append(f"--- {path.name}\n{text[-tail:]}")
        return "\n".join(parts)
