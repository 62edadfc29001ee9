#!/usr/bin/env bash
# Several nodes with torchrun: run this script once on every node with the same RDZV_ENDPOINT (host:port of
# any one of them) and JOB_ID. The c10d rendezvous lets a restarted node rejoin; checkpoints must be on a file
# system every node sees (checkpoint.dir).
#
#   NNODES=2 RDZV_ENDPOINT=node0:29400 JOB_ID=ring42 launch/torchrun_multi_node.sh configs/cuda_single_node.yaml 8
set -euo pipefail
config=${1:?usage: $0 CONFIG NPROC_PER_NODE [overrides...]}
nproc=${2:?usage: $0 CONFIG NPROC_PER_NODE [overrides...]}
shift 2
: "${NNODES:?set NNODES}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}" "${JOB_ID:?set JOB_ID}"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec torchrun --nnodes "$NNODES" --nproc_per_node "$nproc" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" \
    --rdzv-id "$JOB_ID" --max-restarts "${MAX_RESTARTS:-3}" \
    -m ring_flash_attn train --config "$config" --resume "$@"
