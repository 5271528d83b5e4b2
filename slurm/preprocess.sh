#!/bin/bash
# Sharded preprocessing of a large corpus: a Slurm job array tokenizes one shard of the input files per task
# (`python -m pipeline preprocess --shard I/N`), then a job that depends on the whole array (afterok) merges
# the shards into one dataset (`python -m pipeline merge`). Run it from a login node:
#
#   SHARDS=64 INPUT='corpus/web/*.jsonl.gz' TOKENIZER=tok/tokenizer.json OUTPUT_PREFIX=data/web \
#   [PREPROCESS_ARGS='--valid-fraction 0.005 --text-key text'] [CPUS_PER_TASK=16] [TIME_LIMIT=04:00:00] \
#   [PARTITION=cpu] [ACCOUNT=proj] [PYTHON=.venv/bin/python] slurm/preprocess.sh [--dry-run]
#
# Each task writes OUTPUT_PREFIX-shard-0000I-of-0000N.* (published atomically, like any preprocessing run), with
# as many tokenizer workers as CPUs; a failed task fails the array and the merge never runs (resubmit: finished
# shards are simply rewritten). The merge checks every shard used the same tokenizer, --valid-fraction and --seed,
# and writes OUTPUT_PREFIX.*: the dataset one preprocessing run over all the inputs would write (each document's
# train/valid split is a keyed hash of its ids, so it does not depend on the shard).
# INPUT is a glob expanded by Python (quote it), sorted, and cut into N contiguous runs of whole files: give at
# least N files. --dry-run prints the two sbatch lines and the first task's command instead of submitting.
set -euo pipefail

PYTHON="${PYTHON:-python}"
STAGE="${PREPROCESS_STAGE:-submit}"

case "$STAGE" in
shard)
    # Inside an array task.
    CPUS="${SLURM_CPUS_PER_TASK:-$(nproc)}"
    # shellcheck disable=SC2086  # PREPROCESS_ARGS is a list of options
    exec "$PYTHON" -m pipeline preprocess --input "$INPUT" --tokenizer "$TOKENIZER" --output-prefix "$OUTPUT_PREFIX" \
        --shard "${SLURM_ARRAY_TASK_ID}/${SHARDS}" --workers "$CPUS" --quiet ${PREPROCESS_ARGS:-}
    ;;
merge)
    exec "$PYTHON" -m pipeline merge --output-prefix "$OUTPUT_PREFIX" --shards "$SHARDS"
    ;;
submit) ;;
*) echo "slurm/preprocess.sh: unknown PREPROCESS_STAGE=$STAGE" >&2; exit 2 ;;
esac

DRY_RUN=0
if [[ "${1:-}" == --dry-run ]]; then DRY_RUN=1; fi
for name in SHARDS INPUT TOKENIZER OUTPUT_PREFIX; do
    if [[ -z "${!name:-}" ]]; then
        echo "slurm/preprocess.sh: set $name (see the header of this script)" >&2
        exit 2
    fi
done
if ! [[ "$SHARDS" =~ ^[1-9][0-9]*$ ]]; then
    echo "slurm/preprocess.sh: SHARDS must be a positive integer, got $SHARDS" >&2
    exit 2
fi

common=(--parsable --export=ALL)
[[ -n "${PARTITION:-}" ]] && common+=(--partition="$PARTITION")
[[ -n "${ACCOUNT:-}" ]] && common+=(--account="$ACCOUNT")
[[ -n "${TIME_LIMIT:-}" ]] && common+=(--time="$TIME_LIMIT")
log_dir="$(dirname "$OUTPUT_PREFIX")/slurm-logs"
name="preprocess-$(basename "$OUTPUT_PREFIX")"
array=(sbatch "${common[@]}" --job-name="$name" --array="0-$((SHARDS - 1))" --ntasks=1
       --cpus-per-task="${CPUS_PER_TASK:-16}" --output="$log_dir/%x-%A_%a.out" "$0")
merge=(sbatch "${common[@]}" --job-name="merge-$(basename "$OUTPUT_PREFIX")" --ntasks=1 --cpus-per-task=2
       --output="$log_dir/%x-%j.out")

if [[ $DRY_RUN == 1 ]]; then
    echo "PREPROCESS_STAGE=shard ${array[*]}"
    echo "PREPROCESS_STAGE=merge ${merge[*]} --dependency=afterok:<array job id> $0"
    echo "task 0 runs: $PYTHON -m pipeline preprocess --input '$INPUT' --tokenizer $TOKENIZER" \
         "--output-prefix $OUTPUT_PREFIX --shard 0/$SHARDS --workers ${CPUS_PER_TASK:-16} --quiet ${PREPROCESS_ARGS:-}"
    echo "then: $PYTHON -m pipeline merge --output-prefix $OUTPUT_PREFIX --shards $SHARDS"
    exit 0
fi
mkdir -p "$log_dir"
export SHARDS INPUT TOKENIZER OUTPUT_PREFIX PYTHON PREPROCESS_ARGS="${PREPROCESS_ARGS:-}"
array_id="$(PREPROCESS_STAGE=shard "${array[@]}")"
merge_id="$(PREPROCESS_STAGE=merge "${merge[@]}" --dependency="afterok:${array_id%%;*}" "$0")"
echo "submitted shards: job array $array_id (tasks 0-$((SHARDS - 1))); merge: job $merge_id (after all shards succeed)"
