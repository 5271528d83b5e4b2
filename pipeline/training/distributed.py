"""Launcher discovery and process-group setup.

The same ``run_pretrain.py`` runs under every launcher we support; they differ only in how a process learns its
rank and where rank 0 listens:

* ``deepspeed`` and ``torchrun`` export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.
* ``srun`` exports ``SLURM_PROCID``/``SLURM_LOCALID`` and the task count; rank 0's host is the first node of
  ``SLURM_JOB_NODELIST`` and the port is derived from the job id (so two jobs on one node do not collide).
* ``mpirun`` (Open MPI, MPICH, PMIx): ranks come from mpi4py, rank 0 broadcasts its address (the first of
  ``hostname -I``, as DeepSpeed's mpi4py discovery does).

``MASTER_ADDR`` and ``MASTER_PORT`` set in the environment always win (clusters whose first interface is not
the fabric one). With no launcher at all we run a single process on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import asdict, dataclass

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class LaunchInfo:
    launcher: str  # env | slurm | mpi | single
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    def to_dict(self) -> dict:
        return asdict(self)


def free_port() -> int:
    """A TCP port that is free on this host right now (for single-process runs and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Host names of a Slurm node list such as ``gpu[01-03,07],login1``.

    ``scontrol show hostnames`` is the reference; we parse the common forms ourselves when it is not on PATH
    (containers that only see the job's environment)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                                 text=True, timeout=30).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError):
            pass
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            if "-" in item:
                lo, hi = item.split("-", 1)
                hosts.extend(f"{prefix}{i:0{len(lo)}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{item}{suffix}")
    return hosts


def _first_host_address() -> str:
    """Rank 0's address for an mpirun launch: the first of ``hostname -I`` (as DeepSpeed's own mpi4py discovery
    does), which is reachable from other nodes where ``gethostbyname(hostname)`` often gives 127.0.x.x."""
    try:
        addresses = subprocess.run(["hostname", "-I"], check=True, capture_output=True, text=True,
                                   timeout=10).stdout.split()
        if addresses:
            return addresses[0]
    except (subprocess.SubprocessError, OSError):
        pass
    return socket.gethostbyname(socket.gethostname())


def _int_env(env, *names: str) -> int | None:
    for name in names:
        if env.get(name, "") != "":
            return int(env[name])
    return None


def _mpi_world_size(env) -> int | None:
    return _int_env(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS_WORLD")


def discover_launch(env=None) -> LaunchInfo:
    """Works out rank, world size and rendezvous address from the launcher's environment (see module doc)."""
    env = os.environ if env is None else env
    override_addr = env.get("MASTER_ADDR") or None
    override_port = _int_env(env, "MASTER_PORT")

    if all(env.get(name, "") != "" for name in ("RANK", "WORLD_SIZE")):
        return LaunchInfo("env", int(env["RANK"]), int(env["WORLD_SIZE"]), _int_env(env, "LOCAL_RANK") or 0,
                          override_addr or "127.0.0.1", override_port or DEFAULT_MASTER_PORT)

    # srun sets SLURM_STEP_ID for the tasks of a job step; a bare `python` in the batch script has no step id
    # and must not wait for SLURM_NTASKS peers that were never started.
    if env.get("SLURM_PROCID", "") != "" and env.get("SLURM_STEP_ID", "") != "":
        world_size = _int_env(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") or 1
        addr = override_addr
        if addr is None:
            nodes = expand_slurm_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
            addr = nodes[0] if nodes else "127.0.0.1"
        port = override_port or (DEFAULT_MASTER_PORT + int(env.get("SLURM_JOB_ID", "0")) % 10000)
        return LaunchInfo("slurm", int(env["SLURM_PROCID"]), world_size, _int_env(env, "SLURM_LOCALID") or 0,
                          addr, port)

    if (_mpi_world_size(env) or 0) > 1:
        from mpi4py import MPI  # only imported under mpirun: it initialises MPI

        comm = MPI.COMM_WORLD
        rank, world_size = comm.Get_rank(), comm.Get_size()
        hosts = comm.allgather(MPI.Get_processor_name())
        local_rank = sum(host == hosts[rank] for host in hosts[:rank])
        addr = override_addr
        if addr is None:
            addr = comm.bcast(_first_host_address() if rank == 0 else None, root=0)
        port = override_port or DEFAULT_MASTER_PORT
        return LaunchInfo("mpi", rank, world_size, local_rank, addr, port)

    return LaunchInfo("single", 0, 1, 0, override_addr or "127.0.0.1", override_port or free_port())


def export_launch_env(info: LaunchInfo) -> None:
    """Writes the torch.distributed ``env://`` variables so DeepSpeed and torch agree on the rendezvous."""
    os.environ.update({
        "RANK": str(info.rank), "WORLD_SIZE": str(info.world_size), "LOCAL_RANK": str(info.local_rank),
        "MASTER_ADDR": info.master_addr, "MASTER_PORT": str(info.master_port),
    })


def init_distributed(timeout_minutes: float = 30.0) -> LaunchInfo:
    """Discovers the launcher, initialises ``torch.distributed`` through DeepSpeed and binds the local device.

    Returns the launch description (logged and saved with the run)."""
    from datetime import timedelta

    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    info = discover_launch()
    export_launch_env(info)
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(info.local_rank)
    elif os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    # Discovery above already exported the env:// variables (honouring MASTER_ADDR), so DeepSpeed's own
    # mpi4py discovery, which would overwrite MASTER_ADDR, is not needed.
    deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False, timeout=timedelta(minutes=timeout_minutes))
    return info


def control_group():
    """A gloo group for small host-side agreements (stop flags): a CPU all-reduce does not synchronise the
    accelerator stream the way a collective on the NCCL group would."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")
