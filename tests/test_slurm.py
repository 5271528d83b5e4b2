"""slurm/pretrain_base.sh on a real (one-node, throw-away) Slurm cluster, scaled down to 2 CPU tasks.

1. The batch script trains a tiny 3MLself to the end through srun (2 ranks) and the loss falls; a second job
   of the same run with 1 task re-shards the checkpoint (universal checkpoint) and continues.
2. Pre-emption: `scancel --signal=USR1 --batch` mid-run -> the launcher forwards USR1 to the tasks, training
   checkpoints and exits 0, the job requeues itself (Restarts=1), the restart resumes from the saved step and
   finishes; logs of both starts are in the run directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import SlurmCluster, started_cluster_or_skip  # noqa: E402
from pipeline.evaluation.report import ReportError, read_metrics

REPO = Path(__file__).resolve().parent.parent
TRAIN_STEPS = 24


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from started_cluster_or_skip(tmp_path_factory.mktemp("slurm"))


def _job_env(run_dir: Path, dataset_prefix: str, tokenizer: Path, extra: dict | None = None) -> dict:
    """What a user exports for the scaled-down run: 1 node x 2 CPU tasks, the tiny preset, fp32 ZeRO-2."""
    env = {
        "NODES": "1", "GPUS_PER_NODE": "0", "TASKS_PER_NODE": "2", "CPUS_PER_TASK": "1", "MEM_PER_CPU": "0",
        # An hour: the template's USR1 warning comes 300 s before the limit, and a run on a loaded machine can
        # take longer than 5 minutes.
        "TIME_LIMIT": "01:00:00", "JOB_NAME": "t3ml",
        "DS_ACCELERATOR": "cpu", "DS_CONFIG": "zero2_fp32.json", "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
        "PYTHON": sys.executable, "REPO_DIR": str(REPO),
        "DATA_PREFIX": dataset_prefix, "TOKENIZER": str(tokenizer), "RUN_DIR": str(run_dir),
        "TRAIN_ARGS": (f"--model-preset tiny --seq-len 64 --global-batch-size 8 --micro-batch-size 4 "
                       f"--train-steps {TRAIN_STEPS} --lr 2e-3 --log-interval 1 --save-interval 1000 "
                       f"--eval-interval 0 --num-workers 0 --no-progress-bar"),
    }
    env.update(extra or {})
    return env


def _submit(cluster: SlurmCluster, env: dict, run_dir: Path) -> str:
    run_dir.mkdir(parents=True, exist_ok=True)  # sbatch's --output directory must exist
    out = cluster.run(str(REPO / "slurm" / "submit.sh"), str(REPO / "slurm" / "pretrain_base.sh"),
                      f"--output={run_dir}/slurm-%j.out", env=env)
    return out.stdout.strip().split(";")[0]


def _train_records(run_dir: Path) -> list[dict]:
    try:
        return read_metrics(run_dir)[0]
    except ReportError:  # not written yet
        return []


def _diagnostics(cluster: SlurmCluster, run_dir: Path) -> str:
    parts = [cluster.log_tail()]
    for path in sorted(run_dir.glob("slurm-*.out")) + sorted((run_dir / "logs").glob("*.log")):
        parts.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:]))
    return "\n".join(parts)


def test_slurm_batch_script_trains_then_resumes_on_fewer_ranks(cluster, tmp_path, tiny_dataset_prefix, tiny_tokenizer):
    run_dir = tmp_path / "run"
    job_id = _submit(cluster, _job_env(run_dir, tiny_dataset_prefix, tiny_tokenizer), run_dir)
    state = cluster.wait_job_finished(job_id, timeout=240)
    assert state == "COMPLETED", f"job {job_id} ended {state}\n" + _diagnostics(cluster, run_dir)
    losses = [r["loss"] for r in _train_records(run_dir)]
    assert len(losses) == TRAIN_STEPS, _diagnostics(cluster, run_dir)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{TRAIN_STEPS:08d}"
    log = (run_dir / "logs" / f"job-{job_id}-restart-0.log").read_text()
    assert f"job {job_id} restart 0" in log and "2 tasks" in log and "training exited with status 0" in log
    assert cluster.job_field(job_id, "Restarts") == "0"

    # The run continues in a job with one task fewer (a lost node): the launcher re-shards the DP=2
    # checkpoint for DP=1 (universal checkpoint) and resumes it.
    more_steps = TRAIN_STEPS + 4
    env = _job_env(run_dir, tiny_dataset_prefix, tiny_tokenizer, {"TASKS_PER_NODE": "1"})
    env["TRAIN_ARGS"] = env["TRAIN_ARGS"].replace(f"--train-steps {TRAIN_STEPS}", f"--train-steps {more_steps}")
    second = _submit(cluster, env, run_dir)
    state = cluster.wait_job_finished(second, timeout=240)
    assert state == "COMPLETED", f"job {second} ended {state}\n" + _diagnostics(cluster, run_dir)
    log = (run_dir / "logs" / f"job-{second}-restart-0.log").read_text()
    assert "written by 2 ranks, this job has 1: re-sharding" in log, log
    assert f"resumed from {run_dir}/checkpoints/step_{TRAIN_STEPS:08d}: step {TRAIN_STEPS}" in log, log
    steps = [r["step"] for r in _train_records(run_dir)]
    assert steps == list(range(1, more_steps + 1)), steps


def test_slurm_preemption_checkpoints_requeues_and_resumes(cluster, tmp_path, tiny_dataset_prefix,
                                                           tiny_tokenizer):
    run_dir = tmp_path / "run"
    stop_after = 8
    # Training pauses after step `stop_after` (a test hook of pipeline.training.trainer) so the signal lands at a known
    # step; the restarted job resumes after that step and never pauses again.
    env = _job_env(run_dir, tiny_dataset_prefix, tiny_tokenizer,
                   {"PRETRAIN_TEST_PAUSE_AFTER_STEP": f"{stop_after}:60"})
    job_id = _submit(cluster, env, run_dir)
    cluster.wait_for(lambda: any(r["step"] == stop_after for r in _train_records(run_dir)), 180,
                     f"step {stop_after} of job {job_id}", poll=0.5)
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)

    # The job requeues itself: Restarts becomes 1, then the restart runs to the end.
    cluster.wait_for(lambda: cluster.job_field(job_id, "Restarts") == "1", 120, f"job {job_id} to requeue")
    state = cluster.wait_job_finished(job_id, timeout=240)
    assert state == "COMPLETED", f"job {job_id} ended {state}\n" + _diagnostics(cluster, run_dir)

    first_log = (run_dir / "logs" / f"job-{job_id}-restart-0.log").read_text()
    second_log = (run_dir / "logs" / f"job-{job_id}-restart-1.log").read_text()
    assert "SIGUSR1 received" in first_log, first_log
    assert f"requeueing job {job_id}" in first_log, first_log
    assert f"stopped by SIGUSR1 at step {stop_after}" in first_log, first_log
    assert f"resuming from {run_dir}/checkpoints (step_{stop_after:08d})" in second_log, second_log
    assert f"resumed from {run_dir}/checkpoints/step_{stop_after:08d}: step {stop_after}" in second_log, second_log
    steps = [r["step"] for r in _train_records(run_dir)]
    # The metrics of both starts form one run: every step once, the restart continuing after the checkpoint.
    assert steps == list(range(1, TRAIN_STEPS + 1)), steps
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{TRAIN_STEPS:08d}"
    assert not (run_dir / "stopped_by_signal").exists()
    jobs = (run_dir / "logs" / "jobs.tsv").read_text().splitlines()
    assert [line.split("\t")[:2] for line in jobs] == [[job_id, "0"], [job_id, "1"]]


def test_slurm_chain_submits_afterany_links(cluster, tmp_path, tiny_dataset_prefix, tiny_tokenizer):
    """slurm/chain.sh: N jobs, each depending (afterany) on the previous one; submitted held and cancelled, so
    nothing runs."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = _job_env(run_dir, tiny_dataset_prefix, tiny_tokenizer)
    out = cluster.run(str(REPO / "slurm" / "chain.sh"), "3", str(REPO / "slurm" / "pretrain_base.sh"), "--hold",
                      f"--output={run_dir}/slurm-%j.out", env=env)
    job_ids = out.stdout.split()
    try:
        assert len(job_ids) == 3, out.stdout
        assert cluster.job_field(job_ids[0], "Dependency") == "(null)"
        for previous, job_id in zip(job_ids, job_ids[1:]):
            assert cluster.job_field(job_id, "Dependency").startswith(f"afterany:{previous}"), job_id
        for job_id in job_ids:
            assert cluster.job_field(job_id, "Requeue") == "1"  # --requeue from the batch script's header
            assert cluster.job_field(job_id, "TimeLimit") == "01:00:00"  # TIME_LIMIT reached sbatch
    finally:
        cluster.run("scancel", *job_ids, check=False)
