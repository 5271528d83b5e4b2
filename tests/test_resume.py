"""Exact resume: an interrupted run continued with ``--load`` logs bitwise the same per-step losses as the
uninterrupted run (CPU, fp32, torch AdamW, dropout on) -- after a clean stop, a SIGTERM/SIGUSR1, a kill -9 in
the middle of training and a kill -9 inside a save; a damaged newest checkpoint falls back to the previous one;
an incompatible configuration is refused. The uninterrupted baselines are the 12-step runs of test_train.py."""

from __future__ import annotations

import json
import shutil
import signal

import pytest

from test_train import STEPS, baseline_run, layout_args
from train_launch import launch, losses_by_step, read_metrics, run, wait_for

STAGE, TP = 2, 1  # the layout the failure scenarios use
PAUSE = "600"  # seconds a test hook holds a run so the test can kill or signal it deterministically


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_dataset_prefix, tiny_tokenizer):
    return baseline_run(tmp_path_factory, tiny_dataset_prefix, tiny_tokenizer, STAGE, TP)


def args(data, tok, run_dir, stage=STAGE, tp=TP, **overrides):
    return layout_args(data, tok, run_dir, stage, tp, **overrides)


def latest(run_dir) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def logged_steps(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")),
               default=0)


def resume_and_compare(run_dir, baseline_dir, logs, data, tok, **overrides):
    run(args(data, tok, run_dir, load=run_dir, **overrides), logs)
    expected, got = losses_by_step(baseline_dir), losses_by_step(run_dir)
    assert got == expected, f"resumed losses differ:\n  resumed  {got}\n  baseline {expected}"
    evals = [(r["step"], r["loss"]) for r in read_metrics(run_dir, "eval")]
    assert evals == [(r["step"], r["loss"]) for r in read_metrics(baseline_dir, "eval")]


@pytest.mark.parametrize("stage,tp", [(STAGE, TP), (3, 2)], ids=["zero2-tp1", "zero3-tp2"])
def test_stop_and_resume_is_exact(tmp_path, tmp_path_factory, tiny_dataset_prefix, tiny_tokenizer, stage, tp):
    base = baseline_run(tmp_path_factory, tiny_dataset_prefix, tiny_tokenizer, stage, tp)
    run_dir = tmp_path / "run"
    run(args(tiny_dataset_prefix, tiny_tokenizer, run_dir, stage, tp, stop_at_step=STEPS // 2), tmp_path / "l1")
    assert latest(run_dir) == f"step_{STEPS // 2:08d}"
    assert not (run_dir / "stopped_by_signal").exists()
    run(args(tiny_dataset_prefix, tiny_tokenizer, run_dir, stage, tp, load=run_dir), tmp_path / "l2")
    expected, got = losses_by_step(base), losses_by_step(run_dir)
    assert got == expected, f"resumed losses differ:\n  resumed  {got}\n  baseline {expected}"


def test_sigterm_and_sigusr1_save_and_exit_zero_then_resume_exactly(tmp_path, baseline, tiny_dataset_prefix,
                                                                    tiny_tokenizer):
    run_dir = tmp_path / "run"
    started = launch(args(tiny_dataset_prefix, tiny_tokenizer, run_dir), tmp_path / "l1",
                     env_extra={"PRETRAIN_TEST_PAUSE_AFTER_STEP": f"5:{PAUSE}"})
    wait_for(lambda: logged_steps(run_dir) >= 5, 120, "step 5", started)
    # Slurm may signal only some tasks, with USR1 (pre-emption warning) or TERM: all ranks must agree.
    started.procs[0].send_signal(signal.SIGTERM)
    started.procs[1].send_signal(signal.SIGUSR1)
    assert started.wait(120) == [0, 0], started.output()
    stopped = json.loads((run_dir / "stopped_by_signal").read_text())
    assert stopped == {"signal": "SIGTERM", "step": 5, "checkpoint": "step_00000005"}
    assert latest(run_dir) == "step_00000005"
    assert "stopped by SIGTERM at step 5" in started.output()
    resume_and_compare(run_dir, baseline, tmp_path / "l2", tiny_dataset_prefix, tiny_tokenizer)
    assert not (run_dir / "stopped_by_signal").exists()


def test_kill_9_mid_run_resumes_from_last_complete_checkpoint(tmp_path, baseline, tiny_dataset_prefix,
                                                              tiny_tokenizer):
    run_dir = tmp_path / "run"
    started = launch(args(tiny_dataset_prefix, tiny_tokenizer, run_dir, save_interval=4), tmp_path / "l1",
                     env_extra={"PRETRAIN_TEST_PAUSE_AFTER_STEP": f"6:{PAUSE}"})
    wait_for(lambda: logged_steps(run_dir) >= 6, 120, "step 6", started)
    started.kill()
    assert latest(run_dir) == "step_00000004"
    resume_and_compare(run_dir, baseline, tmp_path / "l2", tiny_dataset_prefix, tiny_tokenizer)


def test_kill_9_during_save_never_exposes_a_partial_checkpoint(tmp_path, baseline, tiny_dataset_prefix,
                                                               tiny_tokenizer):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    started = launch(args(tiny_dataset_prefix, tiny_tokenizer, run_dir, save_interval=3), tmp_path / "l1",
                     env_extra={"PRETRAIN_TEST_PAUSE_IN_SAVE": f"6:{PAUSE}"})
    wait_for(lambda: "pausing" in started.output(), 120, "the save of step 6", started)
    assert list((ckpts / ".partial-step_00000006").glob("*model_states.pt"))  # DeepSpeed wrote its files
    started.kill()
    assert latest(run_dir) == "step_00000003"
    assert not (ckpts / "step_00000006").exists()
    resume_and_compare(run_dir, baseline, tmp_path / "l2", tiny_dataset_prefix, tiny_tokenizer)
    assert not list(ckpts.glob(".partial-*")), "leftover of the interrupted save was not cleaned up"

    # A damaged newest checkpoint is reported and --load falls back to the previous complete one.
    assert latest(run_dir) == f"step_{STEPS:08d}"
    newest = ckpts / f"step_{STEPS:08d}"
    victim = next(newest.glob("*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:1000])
    relaunched = run(args(tiny_dataset_prefix, tiny_tokenizer, run_dir, load=run_dir), tmp_path / "l3")
    assert "skipping damaged checkpoint" in relaunched.output() and "truncated" in relaunched.output()
    assert "resumed from" in relaunched.output() and "step 3," in relaunched.output()
    assert losses_by_step(run_dir) == losses_by_step(baseline)


def test_incompatible_config_is_refused(tmp_path, baseline, tiny_dataset_prefix, tiny_tokenizer):
    run_dir = tmp_path / "run"
    shutil.copytree(baseline, run_dir)
    refused = run(args(tiny_dataset_prefix, tiny_tokenizer, run_dir, load=run_dir, train_steps=2 * STEPS,
                       masking_rate=0.3, model_set=["hidden_size=128"]), tmp_path / "l1", expect_rc=1)
    text = refused.output()
    assert "error: refusing to resume from" in text and "incompatible configuration" in text
    assert "masking.rate: checkpoint 0.4, now 0.3" in text and "model.hidden_size: checkpoint 64, now 128" in text
    assert "Traceback" not in text
    assert losses_by_step(run_dir) == losses_by_step(baseline)  # nothing was overwritten

    # Starting afresh into a directory that holds checkpoints would silently discard them.
    refused = run(args(tiny_dataset_prefix, tiny_tokenizer, run_dir), tmp_path / "l2", expect_rc=1)
    assert "already holds checkpoints; pass --load" in refused.output()
