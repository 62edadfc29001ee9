#!/usr/bin/env bash
# One node, every local device (or N CPU processes): torchrun starts the ranks and restarts them all from the
# last checkpoint if one dies (--max-restarts; --resume makes each attempt continue where the last stopped).
#
#   launch/torchrun_single_node.sh configs/cpu_demo.yaml 4            # 4 CPU processes
#   launch/torchrun_single_node.sh configs/cuda_single_node.yaml 8    # 8 GPUs
#   launch/torchrun_single_node.sh configs/xpu_pvc_single_node.yaml 8 --train.steps 50
set -euo pipefail
config=${1:?usage: $0 CONFIG NPROC [overrides...]}
nproc=${2:?usage: $0 CONFIG NPROC [overrides...]}
shift 2

# One OpenMP thread per rank unless asked otherwise: N ranks x all cores each would oversubscribe the CPU.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec torchrun --standalone --nproc_per_node "$nproc" --max-restarts "${MAX_RESTARTS:-3}" \
    -m ring_flash_attn train --config "$config" --resume "$@"
