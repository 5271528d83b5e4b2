"""Stopping on a signal, keeping DataLoader workers alive through it, and the tests' pause hooks.

SIGTERM and SIGUSR1 (Slurm's pre-emption warning) are remembered, not acted on: the training loop agrees on them
over all ranks at the next step boundary, saves and exits (``pipeline.training.trainer``).
"""

from __future__ import annotations

import os
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Test hooks: "STEP:SECONDS". Sleep inside the save of STEP after DeepSpeed wrote its files (so a test can
# kill -9 a save deterministically), or after STEP finished (so a test can kill -9 mid-run).
PAUSE_IN_SAVE_ENV = "PRETRAIN_TEST_PAUSE_IN_SAVE"
PAUSE_AFTER_STEP_ENV = "PRETRAIN_TEST_PAUSE_AFTER_STEP"


class StopSignal:
    """Remembers SIGTERM / SIGUSR1; the loop stops at the next step boundary."""

    def __init__(self):
        self.received: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received = signum


def ignore_late_preemption_warning() -> None:
    """Once the run has ended: a SIGUSR1 (Slurm's pre-emption warning, e.g. 300 s before the time limit) has
    nothing left to save. Ignored rather than handled because CPython puts SIG_DFL back for Python handlers while
    the interpreter shuts down, and a warning landing in a slow shutdown (torch, DeepSpeed, gloo teardown)
    would kill the finished rank (exit 138) and fail its job."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def ignore_stop_signals_in_worker(worker_init_fn):
    """DataLoader workers must survive a SIGTERM sent to the whole process group: the main process decides
    when to stop (after saving) and shuts its workers down itself."""
    def init(worker_id):
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if worker_init_fn is not None:
            worker_init_fn(worker_id)
    return init


def pause_seconds(env_name: str, step: int) -> float:
    """Seconds the test hook ``env_name`` ("STEP:SECONDS") asks to pause at ``step`` (0 when unset)."""
    value = os.environ.get(env_name, "")
    if ":" in value:
        at, seconds = value.split(":", 1)
        if int(at) == step:
            return float(seconds)
    return 0.0
