#!/bin/bash
# Per-task wrapper run by `srun` (slurm/launch.sh): maps Slurm's task ids to the torch.distributed env://
# variables, logs them with the task's node (one line per rank in the job log: which node each rank ran on),
# then execs the training command (exec: signals srun forwards reach python directly). LOCAL_RANK picks the GPU.
set -euo pipefail
export RANK="${SLURM_PROCID:?rank_env.sh: run through srun}"
export LOCAL_RANK="${SLURM_LOCALID:?rank_env.sh: run through srun}"
export WORLD_SIZE="${SLURM_STEP_NUM_TASKS:-${SLURM_NTASKS:?rank_env.sh: run through srun}}"
echo "rank_env.sh: node=${SLURMD_NODENAME:-$(hostname -s)} RANK=$RANK LOCAL_RANK=$LOCAL_RANK WORLD_SIZE=$WORLD_SIZE" \
     "MASTER_ADDR=${MASTER_ADDR:-} MASTER_PORT=${MASTER_PORT:-}" >&2
exec "$@"
