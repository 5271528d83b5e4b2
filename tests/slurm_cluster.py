"""A throw-away Slurm cluster for tests: Debian's slurmctld + slurmd started by hand, on one machine.

No munge (``AuthType=auth/none``, ``CredType=cred/none``), every state, spool, log and pid file under one
temporary directory, private ports, so it never touches a system Slurm. ``SLURM_CONF`` in ``cluster.env`` points
the client commands (sbatch, squeue, scontrol, scancel) at it.

One node (default): ``NodeName`` = this host's short name. ``nodes=N > 1``: N nodes ``n1..nN`` on this machine,
one ``slurmd -N nK`` each on its own port (``NodeHostname`` = this host, ``NodeAddr=127.0.0.1``), so jobs run
across N Slurm nodes whose names are not host names (``n1`` does not resolve), as a launcher must cope with.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SLURM_DAEMONS = ("slurmctld", "slurmd")
SLURM_CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "srun")


def unavailable_reason() -> str | None:
    """Why a test cluster cannot be started here, or None."""
    missing = [name for name in SLURM_DAEMONS + SLURM_CLIENTS if shutil.which(name) is None
               and not Path("/usr/sbin", name).exists()]
    if missing:
        return (f"Slurm not installed ({', '.join(missing)} missing; as root: "
                "apt-get install -y slurmctld slurmd slurm-client, which `make test` does)")
    if os.geteuid() != 0:
        return "the Slurm test cluster runs slurmd as root (it launches jobs for any user); not root"
    return None


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("", 0))
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    return ports


def _free_port_range(count: int, avoid: set[int], tries: int = 50) -> int:
    """The first of ``count`` consecutive free TCP ports (slurm.conf's ``Port=[P-Q]`` for several nodes)."""
    for _ in range(tries):
        first = _free_ports(1)[0]
        if first + count > 65535 or avoid & set(range(first, first + count)):
            continue
        sockets = []
        try:
            for port in range(first, first + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind(("", port))
            return first
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"found no {count} consecutive free TCP ports")


def _daemon(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """``start()`` writes slurm.conf and starts the daemons; ``stop()`` ends them by PID."""

    def __init__(self, root: Path, cpus: int = 2, nodes: int = 1):
        """``cpus``: CPUs of the one node (at least this machine's count); with ``nodes > 1``, CPUs per node
        (taken as given: the nodes share this machine's cores)."""
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.num_nodes = nodes
        self.cpus = max(cpus, os.cpu_count() or 1) if nodes == 1 else cpus
        self.node_names = [self.host] if nodes == 1 else [f"n{k}" for k in range(1, nodes + 1)]
        self.conf = self.root / "slurm.conf"
        self.pids: dict[str, int] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def _node_lines(self, slurmd_port: int) -> str:
        if self.num_nodes == 1:
            return f"NodeName={self.host} CPUs={self.cpus} RealMemory=1000 State=UNKNOWN"
        return (f"NodeName=n[1-{self.num_nodes}] NodeHostname={self.host} NodeAddr=127.0.0.1 "
                f"Port=[{slurmd_port}-{slurmd_port + self.num_nodes - 1}] CPUs={self.cpus} RealMemory=1000 "
                "State=UNKNOWN")

    def write_config(self) -> None:
        ctld_port = _free_ports(1)[0]
        slurmd_port = _free_port_range(self.num_nodes, avoid={ctld_port})
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text(f"""\
ClusterName=t3ml{os.getpid() % 100000}
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/none
CredType=cred/none
# A requeued job may start again after cred_expire seconds (default 120).
AuthInfo=cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=10
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
{self._node_lines(slurmd_port)}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, timeout: float = 60.0) -> None:
        self.write_config()
        # -i: ignore (absent) saved state; both daemons fork and write their pid files.
        subprocess.run([_daemon("slurmctld"), "-f", str(self.conf), "-i"], check=True, env=self.env, timeout=60)
        self._read_pid("slurmctld", self.root / "slurmctld.pid")
        for node in self.node_names:
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
            # -N: this daemon is that node (several slurmd on one machine); the one-node cluster's name is the host's.
            node_option = ["-N", node] if self.num_nodes > 1 else []
            subprocess.run([_daemon("slurmd"), "-f", str(self.conf), *node_option], check=True, env=self.env,
                           timeout=60)
            self._read_pid(f"slurmd-{node}", self.root / f"slurmd-{node}.pid")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if len(states) == self.num_nodes and all(state == "idle" for state in states):
                return
            time.sleep(0.5)
        raise RuntimeError(f"test Slurm nodes never all became idle (sinfo: {states!r}); logs in {self.root}:\n"
                           + self.log_tail())

    def _read_pid(self, name: str, path: Path, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.pids[name] = int(path.read_text().strip())
                return
            except (OSError, ValueError):
                time.sleep(0.1)
        raise RuntimeError(f"{name} wrote no pid file {path}:\n" + self.log_tail())

    def stop(self) -> None:
        # Jobs a failed test left running would outlive the daemons (slurmstepd is separate): cancel them first.
        if self.pids:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%i", check=False).stdout.split():
                    time.sleep(0.5)
        # The slurmd daemons first, then the controller; by PID, never by name.
        for name in [f"slurmd-{node}" for node in self.node_names] + ["slurmctld"]:
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for name in ["slurmctld.log"] + [f"slurmd-{node}.log" for node in self.node_names]:
            path = self.root / name
            if path.is_file():
                # Start-up noise of a fresh cluster (no saved state, no PMIx) hides the interesting lines.
                text = [line for line in path.read_text(errors="replace").splitlines()
                        if not any(noise in line for noise in ("state file", "NOTE:", "pmix", "PMIx"))]
                out.append(f"--- {path}\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    # --- client commands -------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, env: dict | None = None, timeout: float = 60):
        return subprocess.run(list(cmd), check=check, capture_output=True, text=True,
                              env=dict(self.env, **(env or {})), timeout=timeout)

    def node_addr(self, node: str) -> str | None:
        """``NodeAddr`` of ``scontrol show node NODE``."""
        return self.node_field(node, "NodeAddr")

    def node_field(self, node: str, field: str) -> str | None:
        out = self.run("scontrol", "show", "node", "-o", node, check=False).stdout
        for item in out.split():
            if item.startswith(field + "="):
                return item.split("=", 1)[1]
        return None

    def job_field(self, job_id: str, field: str) -> str | None:
        """A ``Key=Value`` field of ``scontrol show job`` (e.g. JobState, Restarts), None if the job is gone."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        for item in out.split():
            if item.startswith(field + "="):
                return item.split("=", 1)[1]
        return None

    def wait_for(self, predicate, timeout: float, what: str, poll: float = 1.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(poll)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")

    def wait_job_finished(self, job_id: str, timeout: float) -> str:
        """Waits until the job has a final state; returns it (COMPLETED, FAILED, ...)."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}
        state = self.wait_for(lambda: (s := self.job_field(job_id, "JobState")) in final and s,
                              timeout, f"job {job_id} to finish")
        return state


def started_cluster_or_skip(root: Path, **options):
    """Yields a started ``SlurmCluster(root, **options)`` and stops it afterwards; skips the calling tests (with
    the reason) where Slurm is not installed, we are not root, or the daemons do not come up. The body of every
    module's ``cluster`` fixture: ``yield from started_cluster_or_skip(tmp_path_factory.mktemp("slurm"))``."""
    import pytest

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(root, **options)
    try:
        cluster.start()
    except (RuntimeError, subprocess.SubprocessError, OSError) as error:
        cluster.stop()
        pytest.skip(f"could not start a test Slurm cluster ({options or 'one node'}): {error}")
    try:
        yield cluster
    finally:
        cluster.stop()
