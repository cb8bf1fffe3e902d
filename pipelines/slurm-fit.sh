#!/usr/bin/env bash
# SLURM: one task per machine, each starting accelerate for that machine's GPUs.
#   sbatch --nodes 4 pipelines/slurm-fit.sh shards/train-{000000..001281}.tar --out runs/x \
#       --config pipelines/imagenet128.toml --resume
#SBATCH --job-name=vqtok-fit
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
set -euo pipefail
export MACHINES=$SLURM_NNODES
export MAIN_ADDRESS=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export GPUS=${SLURM_GPUS_ON_NODE:-8}
# --resume makes a requeued job pick up its latest checkpoint.
srun bash -c 'MACHINE_RANK=$SLURM_NODEID exec pipelines/launch-multigpu.sh "$@"' _ "$@"
