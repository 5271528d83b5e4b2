"""Resume on fewer data-parallel ranks through DeepSpeed's universal checkpoint (python -m pipeline reshard).

A run saved with DP=2 x TP=2 (4 CPU ranks, ZeRO-2) is re-sharded for DP=1 x TP=2 and resumed by 2 ranks: the
consumed-samples position carries over (the next global batches are exactly the ones the DP=2 run would have
used) and, with dropout off, the per-step losses match an uninterrupted DP=2 run -- which also shows the Adam
moments and the LR schedule came through the conversion. (The Slurm test covers TP=1: 2 tasks -> 1 task.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_training import REPO, subprocess_env, tiny_train_args, torchrun, train_losses  # noqa: E402

NO_DROPOUT = ["--model-set", "hidden_dropout=0.0", "--model-set", "attention_dropout=0.0"]
STEPS, STOP = 6, 3


def _args(prefix, tokenizer, run_dir, extra=()):
    return tiny_train_args(prefix, tokenizer, run_dir, steps=STEPS, architecture="3ml-self",
                           ds_config="zero2_fp32.json", tp=2, extra=[*NO_DROPOUT, *extra])


def _python(args: list[str], log: Path) -> str:
    proc = subprocess.run([sys.executable, *args], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def _torchrun_out(nproc: int, args: list[str], log: Path) -> str:
    torchrun(nproc, args, log)
    return log.read_text(errors="replace")


def test_dp2_checkpoint_resumes_on_dp1_with_tp2(tmp_path, tiny_dataset_prefix, tiny_tokenizer):
    reference, first, resharded = tmp_path / "reference", tmp_path / "dp2", tmp_path / "dp1"
    torchrun(4, _args(tiny_dataset_prefix, tiny_tokenizer, reference), tmp_path / "reference.log")
    torchrun(4, _args(tiny_dataset_prefix, tiny_tokenizer, first, ["--stop-at-step", str(STOP)]),
             tmp_path / "dp2.log")

    out = _torchrun_out(2, ["-m", "pipeline", "reshard", str(first), "--output", str(resharded)],
                        tmp_path / "reshard.log")
    assert f"(world 4, DP 2) to {resharded}/checkpoints/step_{STOP:08d} (world 2, DP 1, TP 2)" in out, out
    run_config = json.loads((resharded / "checkpoints" / f"step_{STOP:08d}" / "run_config.json").read_text())
    assert run_config["world"]["data_parallel_size"] == 1
    assert run_config["consumed_samples"] == STOP * 8
    assert not list((resharded / "checkpoints").glob(".universal-*"))  # the intermediate copy is removed

    out = _torchrun_out(2, _args(tiny_dataset_prefix, tiny_tokenizer, resharded, ["--load", str(resharded)]),
                        tmp_path / "resume.log")
    assert f"resumed from {resharded}/checkpoints/step_{STOP:08d}: step {STOP}, {STOP * 8} samples consumed" in out

    expected = dict(train_losses(reference))
    resumed = dict(train_losses(resharded))
    assert sorted(resumed) == list(range(1, STEPS + 1))  # steps 1..3 carried over, 4..6 trained on DP=1
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-4), (step, resumed, expected)
    config = json.loads((resharded / "config.json").read_text())
    assert config["parallel"]["data_parallel_size"] == 1 and config["parallel"]["gradient_accumulation_steps"] == 2
    assert config["parallel"]["tensor_parallel_size"] == 2


def test_zero3_dp2_checkpoint_resumes_on_dp1_bit_exactly(tmp_path, tiny_dataset_prefix, tiny_tokenizer):
    """ZeRO-3, TP=1: 2 ranks -> 1 rank. DeepSpeed's ZeRO-3 universal loader gives every param group the first
    group's weight decay and one shared Adam `step` tensor (torch's AdamW then bias-corrects the second group
    with a step counted twice); pipeline.compat.undo_zero3_universal_loader_changes undoes both at every load, so
    the losses equal the uninterrupted run's."""
    def args(run_dir, extra=()):
        return tiny_train_args(tiny_dataset_prefix, tiny_tokenizer, run_dir, steps=STEPS, architecture="3ml-self",
                               ds_config="zero3_fp32.json", tp=1, extra=[*NO_DROPOUT, *extra])

    reference, first, resharded = tmp_path / "reference", tmp_path / "dp2", tmp_path / "dp1"
    torchrun(2, args(reference), tmp_path / "reference.log")
    torchrun(2, args(first, ["--stop-at-step", str(STOP)]), tmp_path / "dp2.log")
    _torchrun_out(1, ["-m", "pipeline", "reshard", str(first), "--output", str(resharded)], tmp_path / "reshard.log")
    _torchrun_out(1, args(resharded, ["--load", str(resharded)]), tmp_path / "resume.log")
    expected, resumed = dict(train_losses(reference)), dict(train_losses(resharded))
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert [resumed[step] for step in range(1, STEPS + 1)] == [expected[step] for step in range(1, STEPS + 1)]


def test_reshard_refuses_a_missing_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "reshard", str(tmp_path), "--output",
                           str(tmp_path / "out")], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 1 and "no checkpoint" in proc.stderr and "Traceback" not in proc.stderr
