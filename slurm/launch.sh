#!/bin/bash
# Shared Slurm launcher for 3ML pre-training: `exec`-ed by slurm/pretrain_base.sh and slurm/pretrain_large.sh
# inside the batch allocation (exec, so this shell *is* the batch shell and receives `--signal=B:USR1`).
#
# What it does, in order:
#   1. derives the rendezvous: MASTER_ADDR = the address Slurm has for the first node of the allocation
#      (`NodeAddr` of `scontrol show node NAME`; the node's name where Slurm has no other address, so node
#      names need not resolve), MASTER_PORT from the job id; the task count from the allocation itself
#      (SLURM_NNODES x SLURM_TASKS_PER_NODE: a job requeued onto fewer nodes keeps its submission's stale
#      SLURM_NTASKS); each task gets RANK/LOCAL_RANK/WORLD_SIZE from SLURM_PROCID/SLURM_LOCALID/the step's task
#      count (slurm/rank_env.sh, which logs each rank's node); NCCL and OpenMP defaults (only where unset);
#   2. appends everything this job prints to RUN_DIR/logs/job-<id>-restart-<n>.log (one run directory for every
#      job and restart of a run; RUN_DIR/logs/jobs.tsv lists them);
#   3. resumes automatically: if RUN_DIR/checkpoints/latest exists it adds `--load RUN_DIR` (run_pretrain.py
#      then picks the newest intact checkpoint); if that checkpoint was written by a different number of ranks
#      (the job lost or gained nodes), it is first re-sharded in place for this job's world through DeepSpeed's
#      universal checkpoint (`srun python -m pipeline reshard RUN_DIR --output RUN_DIR`; any ZeRO stage, same TP);
#   4. runs `srun ... python run_pretrain.py ...` in the background and waits for it;
#   5. pre-emption: on SIGUSR1 (sent by Slurm `--signal=B:USR1@SECS` before the time limit, or by
#      `scancel --signal=USR1 --batch JOBID`) it forwards USR1 to the srun step (srun passes it on to every
#      task); run_pretrain.py saves a checkpoint at the next step boundary, writes RUN_DIR/stopped_by_signal and
#      exits 0; then this script runs `scontrol requeue $SLURM_JOB_ID` and the requeued job resumes (step 3).
#      SIGTERM (scancel, time limit reached) is forwarded too, but a cancelled job is not requeued.
#
# Alternative launcher (not used here): DeepSpeed's own Slurm launcher starts the tasks through srun itself:
#     deepspeed --launcher slurm --hostfile HOSTFILE --num_nodes "$SLURM_NNODES" \
#         --num_gpus "$SLURM_NTASKS_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
#         run_pretrain.py ARGS...
#   (HOSTFILE lines `host slots=N` from `scontrol show hostnames`). The plain srun form above needs no hostfile,
#   and Slurm then owns every task, so signals, `--kill-on-bad-exit` and accounting work per task.
#
# MPI instead of Slurm (ranks from mpi4py, see pipeline/training/distributed.py; rank 0 broadcasts its address as
# MASTER_ADDR, the port defaults to 29500; set MASTER_ADDR/MASTER_PORT to override, e.g. the fabric address):
#     mpirun -np 8 [--allow-run-as-root] -x PYTHONPATH -x MASTER_PORT python run_pretrain.py ARGS...
#
# Inputs (environment; the batch scripts set defaults):
#   REPO_DIR       checkout holding run_pretrain.py               [default: $SLURM_SUBMIT_DIR]
#   PYTHON         interpreter                                     [default: REPO_DIR/.venv/bin/python, else python3]
#   RUN_DIR        run directory (checkpoints/, metrics.jsonl, logs/)              (required)
#   DATA_PREFIX    prefix written by `python -m pipeline preprocess`              (required)
#   TOKENIZER      tokenizer.json checked against the dataset       [default: none: the dataset's meta is used]
#   RECIPE         paper recipe (base | large) or a recipe JSON     [default: base]
#   DS_CONFIG      DeepSpeed config (name in ds_configs/ or path)   [default: the recipe's]
#   TP_SIZE        tensor-parallel size                              [default: the recipe's / 1]
#   TRAIN_ARGS     extra run_pretrain.py arguments (word-split), e.g. "--model-preset tiny --train-steps 20"
#   REQUEUE_ON_SIGNAL  1: requeue after a USR1 stop (default); 0: just stop (slurm/chain.sh uses 0)
#   RESHARD_ON_WORLD_CHANGE  1: re-shard a checkpoint of another world size before resuming (default); 0: don't
#   MASTER_ADDR / MASTER_PORT   override the derived rendezvous (e.g. the fabric interface's address)
#   LAUNCH_DRY_RUN 1: print the rendezvous, every rank's environment and the exact srun line, start nothing
#                  (slurm/submit.sh --dry-run sets it, with the SLURM_* variables of the layout it would submit)
#
# NCCL and related settings exported (a value already in the environment wins):
#   NCCL_DEBUG=WARN                      NCCL's warnings (a bad interface, a failed IB setup) reach the job log
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1    a failed or timed-out collective aborts the job (so it can be requeued)
#                                        instead of hanging every rank until the time limit
#   CUDA_DEVICE_MAX_CONNECTIONS=1        one hardware queue: kernels and NCCL collectives run in issue order
#                                        (megatron-core's requirement for overlapping TP communication)
#   NCCL_SOCKET_IFNAME / NCCL_IB_HCA     not set: NCCL picks the InfiniBand HCAs and the interface for its
#                                        bootstrap itself; set them where a node has several networks (e.g.
#                                        NCCL_SOCKET_IFNAME=ib0, NCCL_IB_HCA=mlx5_0,mlx5_1) and set MASTER_ADDR to
#                                        that interface's address; NCCL_IB_DISABLE=1 on clusters without IB
set -euo pipefail

DRY_RUN="${LAUNCH_DRY_RUN:-0}"
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "launch.sh: not inside a Slurm job (submit slurm/pretrain_base.sh with sbatch)" >&2
    exit 2
fi

REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}"
if [[ ! -f "$REPO_DIR/run_pretrain.py" ]]; then
    echo "launch.sh: $REPO_DIR/run_pretrain.py not found (set REPO_DIR to the 3ML checkout)" >&2
    exit 2
fi
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO_DIR/.venv/bin/python" ]]; then PYTHON="$REPO_DIR/.venv/bin/python"; else PYTHON=python3; fi
fi
: "${RUN_DIR:?launch.sh: set RUN_DIR (the run directory)}"
: "${DATA_PREFIX:?launch.sh: set DATA_PREFIX (the prefix written by python -m pipeline preprocess)}"
RECIPE="${RECIPE:-base}"
DS_CONFIG="${DS_CONFIG:-}"
TP_SIZE="${TP_SIZE:-}"
TOKENIZER="${TOKENIZER:-}"
TRAIN_ARGS="${TRAIN_ARGS:-}"
REQUEUE_ON_SIGNAL="${REQUEUE_ON_SIGNAL:-1}"
RESHARD_ON_WORLD_CHANGE="${RESHARD_ON_WORLD_CHANGE:-1}"
RESTART_COUNT="${SLURM_RESTART_COUNT:-0}"

# --- rendezvous and environment (only where the user has not set them) -------------------------------------
FIRST_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
if [[ -z "${MASTER_ADDR:-}" && "$DRY_RUN" != 1 ]]; then
    # Slurm's address for the node (NodeAddr), which need not be its name: several slurmd on one machine, or
    # node names that are not host names. Where Slurm has none (or cannot be asked), the name itself.
    MASTER_ADDR="$( (scontrol show node -o "$FIRST_NODE" 2>/dev/null || true) | tr ' ' '\n' \
                    | sed -n 's/^NodeAddr=//p' | head -n 1)"
fi
# The dry run's nodes are hypothetical: it shows the first node's name where the job will ask Slurm for its address.
MASTER_ADDR="${MASTER_ADDR:-$FIRST_NODE}"
# Tasks of this allocation, one count per node: SLURM_TASKS_PER_NODE ("8(x4)", or "2(x3),1") describes the nodes
# the job holds now; SLURM_NTASKS is still the submission's when a requeued job restarted on fewer nodes (e.g.
# after `scontrol update JobId=... NumNodes=2`), and srun would ask for the old count.
tasks_per_node() {
    local part count repeat i
    IFS=, read -r -a parts <<< "${SLURM_TASKS_PER_NODE:-${SLURM_NTASKS:-1}}"
    for part in "${parts[@]}"; do
        count="${part%%(*}"; repeat=1
        [[ "$part" == *"(x"* ]] && { repeat="${part#*(x}"; repeat="${repeat%)}"; }
        for ((i = 0; i < repeat; i++)); do echo "$count"; done
    done
}
NUM_NODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
NUM_TASKS=0
for count in $(tasks_per_node); do NUM_TASKS=$((NUM_TASKS + count)); done

# The dry run: what every rank of this layout would get, from slurm/rank_env.sh itself run with the SLURM_*
# variables srun would give it (block distribution, Slurm's default: ranks fill a node before the next).
dry_run_report() {
    local nodes count node_index=0 rank=0 local_rank
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    echo "launch.sh dry run: $NUM_NODES nodes ($SLURM_JOB_NODELIST), $NUM_TASKS ranks, tasks per node $SLURM_TASKS_PER_NODE"
    echo "rendezvous: MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
    echo "exported to every rank: OMP_NUM_THREADS=$OMP_NUM_THREADS NCCL_DEBUG=$NCCL_DEBUG" \
         "TORCH_NCCL_ASYNC_ERROR_HANDLING=$TORCH_NCCL_ASYNC_ERROR_HANDLING" \
         "CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}" \
         "NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-} NCCL_IB_HCA=${NCCL_IB_HCA:-}"
    for count in $(tasks_per_node); do
        for ((local_rank = 0; local_rank < count; local_rank++)); do
            SLURM_PROCID=$rank SLURM_LOCALID=$local_rank SLURM_STEP_NUM_TASKS=$NUM_TASKS \
                SLURMD_NODENAME="${nodes[$node_index]}" "$REPO_DIR/slurm/rank_env.sh" true 2>&1
            rank=$((rank + 1))
        done
        node_index=$((node_index + 1))
    done
    echo "srun line: $(printf '%q ' "${srun_cmd[@]}" "${train_cmd[@]}")"
}
# Derived from the job id so two jobs sharing a node do not collide; stable across requeues of one job.
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export MASTER_ADDR MASTER_PORT
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
# One OpenMP thread pool per task sized to its CPUs (not the whole node).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO_DIR/.cache/torch_extensions}"
# NCCL and CUDA settings: why each, and what is left to the cluster, in the header.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

# --- the training command -------------------------------------------------------------------------------------
train_cmd=("$PYTHON" "$REPO_DIR/run_pretrain.py" --recipe "$RECIPE" --data-prefix "$DATA_PREFIX" --save "$RUN_DIR")
[[ -n "$TOKENIZER" ]] && train_cmd+=(--tokenizer "$TOKENIZER")
[[ -n "$DS_CONFIG" ]] && train_cmd+=(--deepspeed_config "$DS_CONFIG")
[[ -n "$TP_SIZE" ]] && train_cmd+=(--tensor-parallel-size "$TP_SIZE")
resuming=0
if [[ -f "$RUN_DIR/checkpoints/latest" ]]; then
    resuming=1
    train_cmd+=(--load "$RUN_DIR")
fi
# shellcheck disable=SC2206  # TRAIN_ARGS is a user-supplied, word-split argument string
train_cmd+=(${TRAIN_ARGS})
# srun's layout from the allocation (not from an inherited SLURM_NTASKS; see tasks_per_node), one array for the
# dry run, the re-shard and the training step.
srun_cmd=(srun --kill-on-bad-exit=1 --export=ALL --nodes="$NUM_NODES" --ntasks="$NUM_TASKS" "$REPO_DIR/slurm/rank_env.sh")

if [[ "$DRY_RUN" == 1 ]]; then
    dry_run_report
    exit 0
fi

# --- one run directory for every job and restart ---------------------------------------------------------
mkdir -p "$RUN_DIR/logs"
LOG_FILE="$RUN_DIR/logs/job-${SLURM_JOB_ID}-restart-${RESTART_COUNT}.log"
# tee ignores USR1/TERM: `scancel --full` and the time limit signal every process of the batch step, and a dead
# tee would take this shell down (SIGPIPE) before it could requeue.
exec > >(trap '' USR1 TERM; exec tee -a "$LOG_FILE") 2>&1
printf '%s\t%s\t%s\t%s\t%s\n' "$SLURM_JOB_ID" "$RESTART_COUNT" "$(date -u +%FT%TZ)" "$SLURM_JOB_NODELIST" \
    "$NUM_TASKS" >> "$RUN_DIR/logs/jobs.tsv"

# Pre-emption signals: remembered from here on, forwarded to the running srun step (see the header).
got_usr1=0
got_term=0
srun_pid=""
forward() {  # $1 = signal name
    if [[ -n "$srun_pid" ]]; then kill -s "$1" "$srun_pid" 2>/dev/null || true; fi
}
trap 'got_usr1=1; echo "launch.sh: SIGUSR1 received, asking training to checkpoint and stop"; forward USR1' USR1
trap 'got_term=1; echo "launch.sh: SIGTERM received, asking training to checkpoint and stop"; forward TERM' TERM

if [[ "$resuming" == 1 ]]; then
    echo "launch.sh: resuming from $RUN_DIR/checkpoints ($(cat "$RUN_DIR/checkpoints/latest"))"
    saved_world="$("$PYTHON" -c 'import sys; from pipeline.training.universal import checkpoint_world_size as w; print(w(sys.argv[1]) or "")' "$RUN_DIR" || true)"
    if [[ -n "$saved_world" && "$saved_world" != "$NUM_TASKS" && "$RESHARD_ON_WORLD_CHANGE" == 1 ]]; then
        echo "launch.sh: the checkpoint was written by $saved_world ranks, this job has $NUM_TASKS: re-sharding"
        # Not interrupted by a forwarded signal: the in-place re-shard is atomic and takes a minute or two.
        "${srun_cmd[@]}" "$PYTHON" -m pipeline reshard "$RUN_DIR" --output "$RUN_DIR"
    fi
fi

echo "launch.sh: job $SLURM_JOB_ID restart $RESTART_COUNT on $SLURM_JOB_NODELIST: $NUM_TASKS tasks on $NUM_NODES nodes," \
     "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
echo "launch.sh: ${train_cmd[*]}"

# --- run it, forwarding pre-emption signals ---------------------------------------------------------------------
if [[ "$got_usr1" == 1 || "$got_term" == 1 ]]; then
    # Signalled before training started (e.g. during a re-shard): nothing new to save.
    if [[ "$got_usr1" == 1 && "$got_term" == 0 && "$REQUEUE_ON_SIGNAL" == 1 ]]; then
        echo "launch.sh: signalled before training started; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit 0
fi
# --kill-on-bad-exit: one crashed rank ends the step instead of leaving the others blocked in a collective.
"${srun_cmd[@]}" "${train_cmd[@]}" &
srun_pid=$!
# `wait` returns early (status > 128) when a trapped signal arrives; keep waiting until srun really ended.
train_rc=0
while true; do
    if wait "$srun_pid"; then train_rc=0; else train_rc=$?; fi
    kill -0 "$srun_pid" 2>/dev/null || break
done
srun_pid=""
echo "launch.sh: training exited with status $train_rc"

# run_pretrain.py writes stopped_by_signal after a signal-triggered checkpoint (also when USR1 reached the tasks
# directly, e.g. `scancel --signal=USR1 --full`); a clean stop that was not a cancellation is requeued.
if [[ "$train_rc" == 0 && -f "$RUN_DIR/stopped_by_signal" && "$got_term" == 0 ]]; then
    if [[ "$REQUEUE_ON_SIGNAL" == 1 ]]; then
        echo "launch.sh: checkpoint saved ($(cat "$RUN_DIR/stopped_by_signal")); requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    else
        echo "launch.sh: checkpoint saved; not requeueing (REQUEUE_ON_SIGNAL=$REQUEUE_ON_SIGNAL)"
    fi
fi
exit "$train_rc"
