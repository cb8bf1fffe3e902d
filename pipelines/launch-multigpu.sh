#!/usr/bin/env bash
# Train on every GPU of this machine, or on several machines with MACHINES,
# MACHINE_RANK and MAIN_ADDRESS set (the SLURM script below sets them).
#   pipelines/launch-multigpu.sh SHARDS... --out runs/x --config pipelines/imagenet128.toml
set -euo pipefail
gpus=${GPUS:-$(nvidia-smi --list-gpus | wc -l)}
machines=${MACHINES:-1}
exec accelerate launch \
    --multi_gpu \
    --num_machines "$machines" \
    --machine_rank "${MACHINE_RANK:-0}" \
    --main_process_ip "${MAIN_ADDRESS:-127.0.0.1}" \
    --main_process_port "${MAIN_PORT:-29500}" \
    --num_processes $((gpus * machines)) \
    -m vqtok fit "$@"
