"""slurm/pretrain_base.sh across 4 Slurm nodes: a throw-away cluster of four ``slurmd -N nK`` on this machine
(tests/slurm_cluster.py; 4 CPUs declared per node, so one node can also hold the 4-task comparison run), the
batch script run with environment overrides only (tiny preset, 1 CPU
task per node, fp32 ZeRO-2 on CPU).

1. 4 nodes x 1 task: world size 4, rank k on node n(k+1), MASTER_ADDR is the first node's NodeAddr (node names
   do not resolve here), and the losses equal the same run as 1 node x 4 tasks.
2. USR1 pre-emption across nodes: every node's task checkpoints, the job requeues itself, resumes on 4 nodes and
   ends with the uninterrupted run's losses.
3. Nodes lost: the requeued job restarts on 2 nodes; the launcher takes the task count from the shrunken
   allocation (not the stale SLURM_NTASKS), re-shards the 4-rank checkpoint through the universal checkpoint
   (``python -m pipeline reshard``) and continues to the end.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import SlurmCluster, started_cluster_or_skip  # noqa: E402
from test_slurm import _diagnostics, _job_env, _train_records  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NODES = 4
TRAIN_STEPS = 8
STOP_AFTER = 4
JOB_TIMEOUT = 600  # four 1-CPU ranks on a 2-core machine


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from started_cluster_or_skip(tmp_path_factory.mktemp("slurm4"), cpus=NODES, nodes=NODES)


def _env(run_dir: Path, dataset_prefix: str, tokenizer: Path, nodes: int = NODES, tasks_per_node: int = 1,
         extra: dict | None = None) -> dict:
    """The user's overrides for a tiny run of TRAIN_STEPS steps, global batch 8 (micro-batch 2 per rank). No
    dropout: its masks come from per-rank RNG streams, so they differ between layouts of different world sizes."""
    env = _job_env(run_dir, dataset_prefix, tokenizer, {"NODES": str(nodes), "TASKS_PER_NODE": str(tasks_per_node)})
    env["TRAIN_ARGS"] = (f"--model-preset tiny --model-set hidden_dropout=0 --model-set attention_dropout=0 "
                         f"--seq-len 32 --global-batch-size 8 --micro-batch-size 2 "
                         f"--train-steps {TRAIN_STEPS} --lr 2e-3 --log-interval 1 --save-interval 1000 "
                         f"--eval-interval 0 --num-workers 0 --no-progress-bar")
    env.update(extra or {})
    return env


def _submit(cluster: SlurmCluster, env: dict, run_dir: Path, *sbatch_options: str) -> str:
    run_dir.mkdir(parents=True, exist_ok=True)
    out = cluster.run(str(REPO / "slurm" / "submit.sh"), str(REPO / "slurm" / "pretrain_base.sh"),
                      f"--output={run_dir}/slurm-%j.out", *sbatch_options, env=env)
    return out.stdout.strip().split(";")[0]


def _rank_nodes(log: str) -> dict[int, tuple[str, int, str]]:
    """rank -> (node, world size, MASTER_ADDR) from slurm/rank_env.sh's line of every rank."""
    found = re.findall(r"rank_env\.sh: node=(\S+) RANK=(\d+) LOCAL_RANK=\d+ WORLD_SIZE=(\d+) MASTER_ADDR=(\S*)", log)
    return {int(rank): (node, int(world), addr) for node, rank, world, addr in found}


def _losses(run_dir: Path) -> list[float]:
    return [record["loss"] for record in _train_records(run_dir)]


def _finish(cluster: SlurmCluster, job_id: str, run_dir: Path) -> None:
    state = cluster.wait_job_finished(job_id, timeout=JOB_TIMEOUT)
    assert state == "COMPLETED", f"job {job_id} ended {state}\n" + _diagnostics(cluster, run_dir)


@pytest.fixture(scope="module")
def four_node_run(cluster, tmp_path_factory, tiny_dataset_prefix, tiny_tokenizer):
    """The uninterrupted 4-node run every test compares with: (run dir, job id, losses)."""
    run_dir = tmp_path_factory.mktemp("four_nodes") / "run"
    job_id = _submit(cluster, _env(run_dir, tiny_dataset_prefix, tiny_tokenizer), run_dir)
    _finish(cluster, job_id, run_dir)
    losses = _losses(run_dir)
    assert len(losses) == TRAIN_STEPS, _diagnostics(cluster, run_dir)
    return run_dir, job_id, losses


def test_four_nodes_train_like_one_node_with_four_tasks(cluster, four_node_run, tmp_path, tiny_dataset_prefix,
                                                         tiny_tokenizer):
    run_dir, job_id, losses = four_node_run
    log = (run_dir / "logs" / f"job-{job_id}-restart-0.log").read_text()
    assert f"on n[1-{NODES}]: {NODES} tasks on {NODES} nodes" in log, log
    # Each rank on its own node, all with world size 4 and the first node's address from Slurm (n1 itself does
    # not resolve: the run would not have started with MASTER_ADDR=n1).
    assert cluster.node_addr("n1") == "127.0.0.1"
    assert _rank_nodes(log) == {rank: (f"n{rank + 1}", NODES, "127.0.0.1") for rank in range(NODES)}, log
    config = json.loads((run_dir / "config.json").read_text())
    assert config["launch"]["world_size"] == NODES, config["launch"]

    # The same run as 1 node x 4 tasks gives the same losses.
    one_node_dir = tmp_path / "one_node"
    one_node = _submit(cluster, _env(one_node_dir, tiny_dataset_prefix, tiny_tokenizer, nodes=1, tasks_per_node=4),
                       one_node_dir)
    _finish(cluster, one_node, one_node_dir)
    one_log = (one_node_dir / "logs" / f"job-{one_node}-restart-0.log").read_text()
    assert {node for node, _, _ in _rank_nodes(one_log).values()} == {"n1"}, one_log
    assert len(_rank_nodes(one_log)) == NODES
    assert _losses(one_node_dir) == losses
    assert losses[-1] < losses[0]


def _preempt_at(cluster: SlurmCluster, job_id: str, run_dir: Path, before_signal=None) -> None:
    def reached_step() -> bool:
        if any(r["step"] == STOP_AFTER for r in _train_records(run_dir)):
            return True
        state = cluster.job_field(job_id, "JobState")
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), (
            f"job {job_id} is {state} before step {STOP_AFTER}\n" + _diagnostics(cluster, run_dir))
        return False

    cluster.wait_for(reached_step, JOB_TIMEOUT, f"step {STOP_AFTER} of job {job_id}", poll=0.5)
    if before_signal is not None:
        before_signal()
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)


def _checkpoint_ranks(run_dir: Path, step: int) -> set[int]:
    """Data-parallel ranks with optimizer-state files in the checkpoint of ``step`` (one per rank's node)."""
    files = (run_dir / "checkpoints" / f"step_{step:08d}").rglob("*optim_states.pt")
    return {int(m.group(1)) for path in files if (m := re.search(r"zero_pp_rank_(\d+)_", path.name))}


def test_usr1_preemption_across_nodes_requeues_and_matches_uninterrupted(cluster, four_node_run, tmp_path,
                                                                        tiny_dataset_prefix, tiny_tokenizer):
    _, _, uninterrupted = four_node_run
    run_dir = tmp_path / "run"
    env = _env(run_dir, tiny_dataset_prefix, tiny_tokenizer,
               extra={"PRETRAIN_TEST_PAUSE_AFTER_STEP": f"{STOP_AFTER}:120"})
    job_id = _submit(cluster, env, run_dir)
    _preempt_at(cluster, job_id, run_dir)
    cluster.wait_for(lambda: cluster.job_field(job_id, "Restarts") == "1", 180, f"job {job_id} to requeue")
    _finish(cluster, job_id, run_dir)

    first = (run_dir / "logs" / f"job-{job_id}-restart-0.log").read_text()
    second = (run_dir / "logs" / f"job-{job_id}-restart-1.log").read_text()
    assert "SIGUSR1 received" in first and f"requeueing job {job_id}" in first, first
    assert f"stopped by SIGUSR1 at step {STOP_AFTER}" in first, first
    # Every node's task wrote its shard of the checkpoint.
    assert _checkpoint_ranks(run_dir, STOP_AFTER) == set(range(NODES))
    assert f"resumed from {run_dir}/checkpoints/step_{STOP_AFTER:08d}: step {STOP_AFTER}" in second, second
    assert set(_rank_nodes(second)) == set(range(NODES))
    assert [r["step"] for r in _train_records(run_dir)] == list(range(1, TRAIN_STEPS + 1))
    assert _losses(run_dir) == uninterrupted


def test_requeued_job_on_two_nodes_reshards_and_continues(cluster, four_node_run, tmp_path, tiny_dataset_prefix,
                                                          tiny_tokenizer):
    _, _, uninterrupted = four_node_run
    run_dir = tmp_path / "run"
    env = _env(run_dir, tiny_dataset_prefix, tiny_tokenizer,
               extra={"PRETRAIN_TEST_PAUSE_AFTER_STEP": f"{STOP_AFTER}:120"})
    job_id = _submit(cluster, env, run_dir)
    # Two nodes fail while the job runs (drained: they finish this job, take no new one), then the pre-emption.
    lost = "n[3-4]"
    _preempt_at(cluster, job_id, run_dir, before_signal=lambda: cluster.run(
        "scontrol", "update", f"NodeName={lost}", "State=DRAIN", "Reason=test-lost-nodes"))
    try:
        cluster.wait_for(lambda: cluster.job_field(job_id, "Restarts") == "1"
                         and cluster.job_field(job_id, "JobState") == "PENDING", 180, f"job {job_id} to requeue")
        # What a user does for a requeued job that cannot get its 4 nodes back: shrink it to the nodes left.
        cluster.run("scontrol", "update", f"JobId={job_id}", "NumNodes=2", "NumCPUs=2", "NumTasks=2")
        _finish(cluster, job_id, run_dir)
    finally:
        cluster.run("scontrol", "update", f"NodeName={lost}", "State=RESUME", check=False)

    second = (run_dir / "logs" / f"job-{job_id}-restart-1.log").read_text()
    assert "on n[1-2]: 2 tasks on 2 nodes" in second, second
    assert f"written by {NODES} ranks, this job has 2: re-sharding" in second, second
    assert f"resumed from {run_dir}/checkpoints/step_{STOP_AFTER:08d}: step {STOP_AFTER}" in second, second
    assert {rank: node for rank, (node, _, _) in _rank_nodes(second).items()} == {0: "n1", 1: "n2"}, second
    assert [r["step"] for r in _train_records(run_dir)] == list(range(1, TRAIN_STEPS + 1))
    losses = _losses(run_dir)
    assert losses[:STOP_AFTER] == uninterrupted[:STOP_AFTER]
    # Same samples and masks per global batch (pipeline.data.dataset), the gradient accumulated over 2
    # micro-batches on each of 2 ranks instead of 1 on each of 4: equal up to float rounding.
    assert losses[STOP_AFTER:] == pytest.approx(uninterrupted[STOP_AFTER:], abs=1e-5)


def test_dry_run_prints_the_32_gpu_layout_and_submits_nothing(cluster, tmp_path):
    """slurm/submit.sh --dry-run for the templates' real layout (4 nodes x 8 V100, the #SBATCH defaults): every
    rank's environment and the exact srun line, nothing submitted, nothing written."""
    run_dir = tmp_path / "run"
    env = {"PATH": cluster.env["PATH"], "HOME": str(tmp_path), "SLURM_CONF": cluster.env["SLURM_CONF"],
           "PYTHON": sys.executable, "DATA_PREFIX": "/data/wiki", "RUN_DIR": str(run_dir)}
    out = subprocess.run([str(REPO / "slurm" / "submit.sh"), "--dry-run", str(REPO / "slurm" / "pretrain_base.sh"),
                          "--partition=gpu"], capture_output=True, text=True, env=env, timeout=120, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == f"sbatch line: sbatch --parsable --partition=gpu {REPO}/slurm/pretrain_base.sh "
    assert lines[1] == "launch.sh dry run: 4 nodes (node[1-4]), 32 ranks, tasks per node 8(x4)"
    assert lines[2] == "rendezvous: MASTER_ADDR=node1 MASTER_PORT=20000"
    assert lines[3] == ("exported to every rank: OMP_NUM_THREADS=5 NCCL_DEBUG=WARN TORCH_NCCL_ASYNC_ERROR_HANDLING=1 "
                        "CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_CUDA_ARCH_LIST=7.0 NCCL_SOCKET_IFNAME= NCCL_IB_HCA=")
    # Block distribution: ranks 0-7 on the first node, LOCAL_RANK (the GPU) 0-7 on every node.
    assert lines[4:36] == [f"rank_env.sh: node=node{rank // 8 + 1} RANK={rank} LOCAL_RANK={rank % 8} WORLD_SIZE=32 "
                           "MASTER_ADDR=node1 MASTER_PORT=20000" for rank in range(32)]
    assert lines[36] == (
        f"srun line: srun --kill-on-bad-exit=1 --export=ALL --nodes=4 --ntasks=32 {REPO}/slurm/rank_env.sh "
        f"{sys.executable} {REPO}/run_pretrain.py --recipe base --data-prefix /data/wiki --save {run_dir} "
        "--deepspeed_config multinode_zero2_fp16.json --tensor-parallel-size 1 --micro-batch-size 16 "
        "--save-interval 1000 --eval-interval 5000 --peak-tflops 125 --no-progress-bar ")
    assert len(lines) == 37
    assert not run_dir.exists()
    assert cluster.run("squeue", "-h", "-o", "%i").stdout.strip() == ""

    # Another size through the variables: 2 nodes x 4 tasks on named nodes.
    out = subprocess.run([str(REPO / "slurm" / "submit.sh"), "--dry-run", str(REPO / "slurm" / "pretrain_base.sh")],
                         capture_output=True, text=True, timeout=120, check=True,
                         env=dict(env, NODES="2", GPUS_PER_NODE="4", DRY_RUN_NODELIST="gpu[07-08]"))
    assert "--nodes=2 --gres=gpu:4 --ntasks-per-node=4" in out.stdout.splitlines()[0]
    ranks = [line for line in out.stdout.splitlines() if line.startswith("rank_env.sh:")]
    assert [line.split()[1:4] for line in ranks] == [
        [f"node=gpu0{7 + rank // 4}", f"RANK={rank}", f"LOCAL_RANK={rank % 4}"] for rank in range(8)]
    assert "--nodes=2 --ntasks=8 " in out.stdout.splitlines()[-1]


def test_launcher_counts_tasks_from_the_allocation_not_a_stale_ntasks(cluster, tmp_path):
    """An uneven allocation (2+2+2+1 tasks) with the submission's SLURM_NTASKS=32 left in the environment, as a
    job requeued onto fewer nodes has it: srun gets the 7 tasks the job holds, ranks fill nodes in order."""
    env = {"PATH": cluster.env["PATH"], "HOME": str(tmp_path), "SLURM_CONF": cluster.env["SLURM_CONF"],
           "PYTHON": sys.executable, "DATA_PREFIX": "/data/wiki", "RUN_DIR": str(tmp_path / "run"),
           "LAUNCH_DRY_RUN": "1", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu[1-4]", "SLURM_JOB_NUM_NODES": "4",
           "SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NTASKS": "32", "REPO_DIR": str(REPO)}
    out = subprocess.run([str(REPO / "slurm" / "launch.sh")], capture_output=True, text=True, env=env, timeout=120,
                         check=True).stdout.splitlines()
    assert out[0] == "launch.sh dry run: 4 nodes (gpu[1-4]), 7 ranks, tasks per node 2(x3),1"
    ranks = [line.split()[1:5] for line in out if line.startswith("rank_env.sh:")]
    assert ranks == [[f"node=gpu{node}", f"RANK={rank}", f"LOCAL_RANK={local}", "WORLD_SIZE=7"]
                     for rank, (node, local) in enumerate([(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1), (4, 0)])]
    assert out[-1].startswith("srun line: srun --kill-on-bad-exit=1 --export=ALL --nodes=4 --ntasks=7 ")
