"""Helpers for the training tests: launch ``run_pretrain.py`` on N CPU ranks and read what it logged.

Ranks are started the way ``srun`` or a scheduler would (one process each, ``RANK``/``WORLD_SIZE``/
``MASTER_ADDR``/``MASTER_PORT`` in the environment), which keeps the ~10 s start-up of each run low and lets a
test signal or kill individual ranks. ``launcher="torchrun"`` / ``"deepspeed"`` go through those launchers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.training.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BIN = Path(PYTHON).parent


def training_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({"PYTHONPATH": os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p),
                "DS_ACCELERATOR": env.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "TORCH_EXTENSIONS_DIR": env.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
                "PYTHONWARNINGS": "ignore"})
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_STEP_ID"):
        env.pop(name, None)
    env.update(extra or {})
    return env


def tiny_args(data_prefix: str, tokenizer: str, save: Path | None, **overrides) -> list[str]:
    """Arguments of a fast tiny-model run on the test fixture; keyword overrides replace/add options
    (``stop_at_step=4`` -> ``--stop-at-step 4``; value None removes the option, True adds a bare flag)."""
    options = {
        "data_prefix": data_prefix, "tokenizer": tokenizer, "model_preset": "tiny", "seq_len": 64,
        "global_batch_size": 8, "micro_batch_size": 4, "train_steps": 8, "lr": 3e-3, "warmup_proportion": 0.0,
        "log_interval": 1, "eval_interval": 4, "eval_iters": 2, "save_interval": 1000, "num_workers": 0,
        "deepspeed_config": "zero2_fp32.json", "no_progress_bar": True, "save": str(save) if save else None,
    }
    options.update(overrides)
    args = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--deepspeed_config" if key == "deepspeed_config" else "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                args += [flag, str(item)]
        else:
            args += [flag, str(value)]
    return args


@dataclass
class Launch:
    procs: list[subprocess.Popen]
    log_paths: list[Path]

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"training did not finish in {timeout}s\n{self.output()}")
        return codes

    def signal(self, signum: int) -> None:
        """Sends ``signum`` to each launched process group (a rank and its DataLoader workers)."""
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signum)

    def kill(self) -> None:
        """kill -9 every process of the run (rank processes and, for launchers, their children)."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            proc.wait(timeout=30)

    def output(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-6000:]}" for p in self.log_paths if p.exists())


def launch(args: list[str], log_dir: Path, nproc: int = 2, launcher: str = "env", env_extra: dict | None = None
           ) -> Launch:
    """Starts a run; every process leads its own process group so a test can kill it and its children."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = training_env(env_extra)
    port = free_port()
    script = str(REPO / "run_pretrain.py")
    commands, envs = [], []
    if launcher == "env":
        for rank in range(nproc):
            commands.append([PYTHON, script, *args])
            envs.append(dict(env, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                             MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
    elif launcher == "torchrun":
        commands.append([str(BIN / "torchrun"), f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                         f"--master_port={port}", script, *args])
        envs.append(env)
    elif launcher == "deepspeed":
        commands.append([str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_addr", "127.0.0.1",
                         "--master_port", str(port), script, *args])
        envs.append(env)
    elif launcher == "mpirun":
        commands.append([str(BIN / "mpirun"), "--allow-run-as-root", "--oversubscribe", "-np", str(nproc),
                         "-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={port}", PYTHON, script, *args])
        envs.append(env)
    else:
        raise ValueError(launcher)
    procs, logs = [], []
    for i, (command, proc_env) in enumerate(zip(commands, envs)):
        log_path = log_dir / f"{launcher}_{i}.log"
        handle = open(log_path, "w")
        procs.append(subprocess.Popen(command, env=proc_env, cwd=str(REPO), stdout=handle, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        logs.append(log_path)
    return Launch(procs, logs)


def run(args: list[str], log_dir: Path, expect_rc: int = 0, timeout: float = 300, **kwargs) -> Launch:
    """Launches, waits and asserts every process exited with ``expect_rc``."""
    started = launch(args, log_dir, **kwargs)
    codes = started.wait(timeout)
    assert all(code == expect_rc for code in codes), f"exit codes {codes}, expected {expect_rc}\n{started.output()}"
    return started


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["kind"] == kind]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def wait_for(predicate, timeout: float, what: str, launch_: Launch | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if launch_ is not None and any(p.poll() is not None for p in launch_.procs):
            raise AssertionError(f"run exited while waiting for {what}\n{launch_.output()}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{launch_.output()}" if launch_ else ""))


# Runs shared between test modules (a baseline trained once serves the loss test and the resume tests).
_CACHE: dict[tuple, Path] = {}


def cached_run(tmp_path_factory, key: tuple, args_for_dir, **launch_kwargs) -> Path:
    """Runs ``args_for_dir(run_dir)`` once per session for ``key``; returns the run directory."""
    if key not in _CACHE:
        root = tmp_path_factory.mktemp("train_" + "_".join(str(k) for k in key))
        run(args_for_dir(root / "run"), root / "logs", **launch_kwargs)
        _CACHE[key] = root / "run"
    return _CACHE[key]
