"""A pre-emption warning (SIGUSR1) that lands after training has ended must not kill the finished rank.

CPython puts SIG_DFL back for Python-level handlers while the interpreter shuts down; a rank whose shutdown is
slow (torch, DeepSpeed, gloo teardown) and gets Slurm's USR1 then dies with exit 138 and fails its job (seen on
the 4-node test cluster under load). ``pipeline.training.trainer.main`` ignores SIGUSR1 once the run is over.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A process that installs the trainer's stop handler, "finishes", then shuts down slowly.
CHILD = """
import sys, time
from pipeline.training.signals import StopSignal, ignore_late_preemption_warning
StopSignal()
class SlowShutdown:
    def __del__(self):
        time.sleep(4)
keep = SlowShutdown()
if sys.argv[1] == "fixed":
    ignore_late_preemption_warning()
print("finished", flush=True)
"""


def _exit_status_with_usr1_in_shutdown(mode: str) -> int:
    child = subprocess.Popen([sys.executable, "-c", CHILD, mode], cwd=REPO, stdout=subprocess.PIPE, text=True,
                             env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert child.stdout.readline().strip() == "finished"
    time.sleep(1.0)  # inside the 4 s shutdown
    child.send_signal(signal.SIGUSR1)
    return child.wait(timeout=60)


def test_usr1_during_shutdown_kills_a_rank_without_the_guard_and_not_with_it():
    assert _exit_status_with_usr1_in_shutdown("unguarded") == -signal.SIGUSR1
    assert _exit_status_with_usr1_in_shutdown("fixed") == 0


def test_trainer_main_ignores_usr1_once_the_run_is_over(monkeypatch):
    from pipeline.training import trainer

    class FinishedRun:
        is_rank0 = True

        def __init__(self, config):
            pass

        def train(self):
            return 0

    previous = signal.getsignal(signal.SIGUSR1)
    monkeypatch.setattr(trainer, "configure", lambda argv: object())
    monkeypatch.setattr(trainer, "Trainer", FinishedRun)
    try:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        assert trainer.main([]) == 0
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, previous)
