"""Exact resume: an interrupted run continued with ``--load`` logs bitwise the same per-step losses as the
uninterrupted run (CPU, fp32, torch AdamW, dropout on) -- after a clean stop, a SIGTERM/SIGUSR1, a kill -9 in
the middle of training and a kill -9 inside a save; a damaged newest checkpoint falls back to the previous one;
an incompatible configuration is refused. The uninterrupted baselines are the 12-step runs of test_train.py."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from test_train import LR, STEPS, baseline_run, layout_args
from train_launch import launch, losses_by_step, read_metrics, run, wait_for

STAGE, TP = 2, 1  # the layout the failure scenarios use
REPO_DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"
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
                       masking_rate=0.3, model_set=["hidden_size=128"], lr=2 * LR, micro_batch_size=2),
                  tmp_path / "l1", expect_rc=1)
    text = refused.output()
    assert "error: refusing to resume from" in text and "incompatible configuration" in text
    assert "masking.rate: checkpoint 0.4, now 0.3" in text and "model.hidden_size: checkpoint 64, now 128" in text
    assert f"training.lr: checkpoint {LR!r}, now {2 * LR!r}" in text
    assert "micro_batch_size" not in text.split("incompatible configuration")[1]  # allowed, not refused
    assert "Traceback" not in text
    assert losses_by_step(run_dir) == losses_by_step(baseline)  # nothing was overwritten

    # Starting afresh into a directory that holds checkpoints would silently discard them.
    refused = run(args(tiny_dataset_prefix, tiny_tokenizer, run_dir), tmp_path / "l2", expect_rc=1)
    assert "already holds checkpoints; pass --load" in refused.output()


def test_resume_on_other_gpus_may_change_micro_batch_and_deepspeed_buckets(tmp_path, baseline, tiny_dataset_prefix,
                                                                          tiny_tokenizer):
    """Moving a run to other GPUs changes the micro-batch size and DeepSpeed's communication settings: the resume
    is allowed with a notice naming each change, and continues the same optimisation (same global batches of the
    same samples; sums in another order and other dropout draws, so close to the baseline, not bitwise)."""
    run_dir = tmp_path / "run"
    run(args(tiny_dataset_prefix, tiny_tokenizer, run_dir, stop_at_step=STEPS // 2), tmp_path / "l1")
    moved = json.loads((REPO_DS_CONFIGS / "zero2_fp32.json").read_text())
    moved["zero_optimization"].update(reduce_bucket_size=1000, allgather_bucket_size=2000, overlap_comm=True)
    ds_path = tmp_path / "zero2_moved.json"
    ds_path.write_text(json.dumps(moved))
    resumed = run(args(tiny_dataset_prefix, tiny_tokenizer, run_dir, load=run_dir, micro_batch_size=2,
                       deepspeed_config=str(ds_path)), tmp_path / "l2")
    text = resumed.output()
    assert "note: resuming with changed implementation settings" in text, text[-3000:]
    for change in ("training.micro_batch_size: checkpoint 4, now 2", "parallel.gradient_accumulation_steps: "
                   "checkpoint 1, now 2", "zero_optimization.reduce_bucket_size: checkpoint 50000000, now 1000",
                   "zero_optimization.overlap_comm: checkpoint False, now True"):
        assert change in text, change
    assert "resumed from" in text and f"step {STEPS // 2}," in text
    expected, got = losses_by_step(baseline), losses_by_step(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in range(1, STEPS // 2 + 1)] == [expected[s] for s in range(1, STEPS // 2 + 1)]
    for step in range(STEPS // 2 + 1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], abs=0.02), (step, got, expected)  # measured <= 3e-3
    config = json.loads((run_dir / "config.json").read_text())
    assert config["training"]["micro_batch_size"] == 2 and config["parallel"]["gradient_accumulation_steps"] == 2


def test_latest_with_non_utf8_bytes_falls_back_on_every_rank(tmp_path, baseline, tiny_dataset_prefix,
                                                             tiny_tokenizer):
    run_dir = tmp_path / "run"
    shutil.copytree(baseline, run_dir)
    (run_dir / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00step_\xc3\x28")
    relaunched = run(args(tiny_dataset_prefix, tiny_tokenizer, run_dir, load=run_dir), tmp_path / "l1")
    text = relaunched.output()
    assert "skipping damaged checkpoint" in text and "no such checkpoint directory" in text
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{STEPS:08d}'}" in text
    assert "Traceback" not in text and "gloo" not in text.lower()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB file system (a tiny checkpoint needs ~2.6 MB); root only."""
    import os
    import subprocess

    mount_point = tmp_path / "full"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount_point)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_save_into_a_full_file_system_is_one_line_and_leaves_no_partial(tmp_path, small_tmpfs, tiny_dataset_prefix,
                                                                        tiny_tokenizer):
    run_dir = small_tmpfs / "run"
    failed = run(args(tiny_dataset_prefix, tiny_tokenizer, run_dir, save_interval=2), tmp_path / "l1", expect_rc=1)
    text = failed.output()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text[-4000:]  # one line for the run: rank 0 reports, the other rank exits quietly
    assert "no space left on device" in errors[0] and ".partial-step_00000002" in errors[0], errors
    assert "checkpoint of step 2 not saved" in errors[0]
    assert "Traceback" not in text and "enforce fail" not in text
    checkpoints = run_dir / "checkpoints"
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".partial-")]
    assert not (checkpoints / "latest").exists()
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]  # training itself went on until the save
