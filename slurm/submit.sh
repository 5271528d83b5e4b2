#!/bin/bash
# Submits a pre-training batch script with the job size taken from variables instead of its #SBATCH defaults.
#
#   [NODES=4] [GPUS_PER_NODE=8] [TASKS_PER_NODE=...] [CPUS_PER_TASK=5] [MEM_PER_CPU=12G] [TIME_LIMIT=24:00:00] \
#   [PARTITION=gpu] [ACCOUNT=proj] [JOB_NAME=...] [DEPENDENCY=afterany:123] \
#       slurm/submit.sh [--dry-run] slurm/pretrain_base.sh [more sbatch options...]
#
# --dry-run submits nothing: it prints the sbatch line, then runs the batch script's launcher for the layout it
# would get (LAUNCH_DRY_RUN=1, node names DRY_RUN_NODELIST, default node[1-NODES]): the rendezvous, every rank's
# environment (RANK, LOCAL_RANK, WORLD_SIZE, node) and the exact srun line. Check it before spending a queue slot.
#
# Unset variables keep the script's #SBATCH value. GPUS_PER_NODE=0 submits a CPU job (`--gres=none`; then
# TASKS_PER_NODE sets the number of ranks per node and DS_ACCELERATOR=cpu should be exported). Every other
# variable of the environment (DATA_PREFIX, RUN_DIR, RECIPE, DS_CONFIG, TRAIN_ARGS, ...) reaches the job
# (sbatch's default --export=ALL). Prints the job id.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == --dry-run ]]; then DRY_RUN=1; shift; fi
if [[ $# -lt 1 || ! -f "$1" ]]; then
    echo "usage: slurm/submit.sh [--dry-run] BATCH_SCRIPT [sbatch options...]  (${1:-no script given}: not a file)" >&2
    exit 2
fi
BATCH_SCRIPT="$1"
shift

NODES="${NODES:-}"
GPUS_PER_NODE="${GPUS_PER_NODE:-}"
TASKS_PER_NODE="${TASKS_PER_NODE:-$GPUS_PER_NODE}"   # one task per GPU
CPUS_PER_TASK="${CPUS_PER_TASK:-}"
MEM_PER_CPU="${MEM_PER_CPU:-}"
TIME_LIMIT="${TIME_LIMIT:-}"
PARTITION="${PARTITION:-}"
ACCOUNT="${ACCOUNT:-}"
JOB_NAME="${JOB_NAME:-}"
DEPENDENCY="${DEPENDENCY:-}"

sbatch_args=(--parsable)
[[ -n "$NODES" ]] && sbatch_args+=(--nodes="$NODES")
if [[ -n "$GPUS_PER_NODE" ]]; then
    if [[ "$GPUS_PER_NODE" == 0 ]]; then sbatch_args+=(--gres=none); else sbatch_args+=(--gres="gpu:$GPUS_PER_NODE"); fi
fi
[[ -n "$TASKS_PER_NODE" && "$TASKS_PER_NODE" != 0 ]] && sbatch_args+=(--ntasks-per-node="$TASKS_PER_NODE")
[[ -n "$CPUS_PER_TASK" ]] && sbatch_args+=(--cpus-per-task="$CPUS_PER_TASK")
[[ -n "$MEM_PER_CPU" ]] && sbatch_args+=(--mem-per-cpu="$MEM_PER_CPU")
[[ -n "$TIME_LIMIT" ]] && sbatch_args+=(--time="$TIME_LIMIT")
[[ -n "$PARTITION" ]] && sbatch_args+=(--partition="$PARTITION")
[[ -n "$ACCOUNT" ]] && sbatch_args+=(--account="$ACCOUNT")
[[ -n "$JOB_NAME" ]] && sbatch_args+=(--job-name="$JOB_NAME")
[[ -n "$DEPENDENCY" ]] && sbatch_args+=(--dependency="$DEPENDENCY")
# REPO_DIR reaches the job so the batch script finds launch.sh wherever sbatch is run from.
export REPO_DIR="${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"

if [[ "$DRY_RUN" == 0 ]]; then
    exec sbatch "${sbatch_args[@]}" "$@" "$BATCH_SCRIPT"
fi

# --- dry run: the layout from the variables, else the script's #SBATCH defaults --------------------------------
sbatch_default() {  # $1 = long option name; the script's #SBATCH --NAME=VALUE
    sed -n "s/^#SBATCH --$1=\([^ ]*\).*/\1/p" "$BATCH_SCRIPT" | tail -n 1
}
layout_nodes="${NODES:-$(sbatch_default nodes)}"
layout_tasks="${TASKS_PER_NODE:-$(sbatch_default ntasks-per-node)}"
layout_cpus="${CPUS_PER_TASK:-$(sbatch_default cpus-per-task)}"
layout_nodes="${layout_nodes:-1}"; layout_tasks="${layout_tasks:-1}"; layout_cpus="${layout_cpus:-1}"
if [[ ! "$layout_nodes$layout_tasks$layout_cpus" =~ ^[0-9]+$ ]]; then
    echo "submit.sh --dry-run: nodes=$layout_nodes, tasks per node=$layout_tasks, cpus per task=$layout_cpus:" \
         "give whole numbers (NODES, TASKS_PER_NODE, CPUS_PER_TASK)" >&2
    exit 2
fi
echo "sbatch line: $(printf '%q ' sbatch "${sbatch_args[@]}" "$@" "$BATCH_SCRIPT")"
if [[ "$layout_nodes" == 1 ]]; then default_nodelist=node1; else default_nodelist="node[1-$layout_nodes]"; fi
env LAUNCH_DRY_RUN=1 SLURM_JOB_ID=0 SLURM_SUBMIT_DIR="$REPO_DIR" \
    SLURM_JOB_NODELIST="${DRY_RUN_NODELIST:-$default_nodelist}" \
    SLURM_JOB_NUM_NODES="$layout_nodes" SLURM_NNODES="$layout_nodes" \
    SLURM_TASKS_PER_NODE="$layout_tasks(x$layout_nodes)" SLURM_NTASKS="$((layout_nodes * layout_tasks))" \
    SLURM_CPUS_PER_TASK="$layout_cpus" \
    bash "$BATCH_SCRIPT"
