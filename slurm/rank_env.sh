#!/bin/bash
# Per-task wrapper run by `srun` (slurm/launch.sh): maps Slurm's task ids to the torch.distributed env://
# variables, then execs the training command (exec: signals srun forwards reach python directly).
set -euo pipefail
export RANK="${SLURM_PROCID:?rank_env.sh: run through srun}"
export LOCAL_RANK="${SLURM_LOCALID:?rank_env.sh: run through srun}"
export WORLD_SIZE="${SLURM_STEP_NUM_TASKS:-${SLURM_NTASKS:?rank_env.sh: run through srun}}"
exec "$@"
