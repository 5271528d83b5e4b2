#!/bin/bash
# 3MLself-base pre-training (paper Table 4: post-LN, seq 512, batch 2048, peak lr 7e-4, 153K steps) on
# 4 nodes x 8 V100 (32 GPUs, one task per GPU), fp16 with dynamic loss scaling, ZeRO-2
# (ds_configs/multinode_zero2_fp16.json: overlapped gradient reduction sized for 32 ranks).
#
#   sbatch slurm/pretrain_base.sh                          # uses the variables below
#   DATA_PREFIX=/data/wiki_bc RUN_DIR=/scratch/runs/base sbatch slurm/pretrain_base.sh
#   NODES=2 GPUS_PER_NODE=8 PARTITION=gpu ACCOUNT=proj slurm/submit.sh slurm/pretrain_base.sh
#   slurm/chain.sh 6 slurm/pretrain_base.sh                # 6 chained jobs for short time limits
#   slurm/submit.sh --dry-run slurm/pretrain_base.sh       # every rank's environment + the srun line, no job
#
# Size, partition, account and time limit: the #SBATCH lines below are the defaults; override them on the
# command line (`sbatch --nodes=2 ...`), with SBATCH_PARTITION / SBATCH_ACCOUNT / SBATCH_TIMELIMIT, or through
# slurm/submit.sh (NODES, GPUS_PER_NODE, CPUS_PER_TASK, ...). The same script runs scaled down, e.g. on one
# node with 2 CPU tasks and a tiny model:
#   NODES=1 GPUS_PER_NODE=0 TASKS_PER_NODE=2 CPUS_PER_TASK=1 DS_ACCELERATOR=cpu DS_CONFIG=zero2_fp32.json \
#   TRAIN_ARGS="--model-preset tiny --seq-len 64 --global-batch-size 8 --micro-batch-size 4 --train-steps 40" \
#   DATA_PREFIX=... RUN_DIR=... slurm/submit.sh slurm/pretrain_base.sh
#
# Pre-emption: Slurm sends SIGUSR1 to this batch shell 300 s before the time limit (up to 60 s earlier); the
# launcher forwards it to the training tasks, which checkpoint at the next step boundary, and the job requeues
# itself and resumes from the checkpoint. A manual pre-emption: `scancel --signal=USR1 --batch JOBID`.
#
#SBATCH --job-name=3ml-base
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=5
#SBATCH --mem-per-cpu=12G
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# ---- what a user changes (environment overrides win) --------------------------------------------------------
export REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}"   # the 3ML checkout (sbatch copies this script away)
export RECIPE="${RECIPE:-base}"                             # ds_configs/recipe_base.json
export DATA_PREFIX="${DATA_PREFIX:-$REPO_DIR/data/pretrain}"  # python -m pipeline preprocess --output-prefix
export TOKENIZER="${TOKENIZER:-}"                           # tokenizer.json (checked against the dataset)
export RUN_DIR="${RUN_DIR:-$REPO_DIR/runs/3mlself-base}"    # checkpoints, metrics, logs of every restart
export DS_CONFIG="${DS_CONFIG:-multinode_zero2_fp16.json}"  # V100: fp16 + dynamic loss scaling, ZeRO-2 for 4 x 8
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-7.0}"  # V100 (sm_70): DeepSpeed's JIT-built ops (FusedAdam)
export TP_SIZE="${TP_SIZE:-1}"                              # tensor parallelism (base fits one V100)
export TRAIN_ARGS="${TRAIN_ARGS:---micro-batch-size 16 --save-interval 1000 --eval-interval 5000 --peak-tflops 125 --no-progress-bar}"
export REQUEUE_ON_SIGNAL="${REQUEUE_ON_SIGNAL:-1}"

exec "$REPO_DIR/slurm/launch.sh"
