#!/bin/bash
# Chained jobs for clusters with short time limits: N jobs of one run, each starting when the previous one has
# ended for any reason (`--dependency=afterany`), each resuming from the run's latest checkpoint.
#
#   [TIME_LIMIT=04:00:00] [NODES=...] [...] slurm/chain.sh N slurm/pretrain_base.sh [sbatch options...]
#
# Near its time limit a job gets SIGUSR1 (`--signal=B:USR1@300` in the batch script), checkpoints and stops; in
# a chain it does not requeue itself (REQUEUE_ON_SIGNAL=0: the next link continues), so a run never has two
# jobs at once. Links that start after the run has reached its last step resume, find nothing to do and exit
# within a minute. Same variables as slurm/submit.sh; prints the job ids.
set -euo pipefail

if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ || ! -f "$2" ]]; then
    echo "usage: slurm/chain.sh N BATCH_SCRIPT [sbatch options...]  (N >= 1; BATCH_SCRIPT must be a file)" >&2
    exit 2
fi
NUM_JOBS="$1"
BATCH_SCRIPT="$2"
shift 2
SUBMIT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/submit.sh"

export REQUEUE_ON_SIGNAL=0
previous=""
for ((link = 1; link <= NUM_JOBS; link++)); do
    if [[ -n "$previous" ]]; then
        job_id="$(DEPENDENCY="afterany:$previous" "$SUBMIT" "$BATCH_SCRIPT" "$@")"
    else
        job_id="$("$SUBMIT" "$BATCH_SCRIPT" "$@")"
    fi
    job_id="${job_id%%;*}"   # --parsable prints "id[;cluster]"
    echo "$job_id"
    previous="$job_id"
done
