"""Runs run_pretrain.py with 2 local ranks (torchrun) for the export / universal-checkpoint tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def subprocess_env() -> dict:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "TORCH_EXTENSIONS_DIR": env.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))})
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def tiny_train_args(dataset_prefix: str, tokenizer: Path, run_dir: Path, *, steps: int, architecture: str,
                    ds_config: str, tp: int, extra: list[str] | None = None) -> list[str]:
    return [str(REPO / "run_pretrain.py"), "--data-prefix", dataset_prefix, "--tokenizer", str(tokenizer),
            "--save", str(run_dir), "--architecture", architecture, "--model-preset", "tiny",
            "--deepspeed_config", ds_config, "--tensor-parallel-size", str(tp), "--seq-len", "64",
            "--global-batch-size", "8", "--micro-batch-size", "4", "--train-steps", str(steps), "--lr", "2e-3",
            "--log-interval", "1", "--save-interval", "1000", "--eval-interval", "0", "--num-workers", "0",
            "--no-progress-bar", *(extra or [])]


def torchrun(nproc: int, args: list[str], log: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N run_pretrain.py ARGS`` with the test environment; output to ``log``."""
    from pipeline.training.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), *args]
    with open(log, "w") as out:
        proc = subprocess.run(cmd, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
    return proc


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    records = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train":
            records.append((record["step"], record["loss"]))
    return records
