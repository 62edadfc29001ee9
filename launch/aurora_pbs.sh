#!/usr/bin/env bash
# Aurora (ALCF), PBS Pro + mpiexec (HPE PALS). Submit from the repository root:
#
#   qsub -l select=2 -l walltime=02:00:00 -A YOUR_PROJECT -q prod -l filesystems=home:flare \
#        -v CONFIG=configs/aurora_multinode.yaml launch/aurora_pbs.sh
#
# 12 ranks per node, one per Ponte Vecchio tile (6 cards x 2 tiles, exposed as 12 XPU devices by the default
# ZE_FLAT_DEVICE_HIERARCHY=FLAT). comm/launch.py takes the rank from PMI_RANK / PMIX_RANK, the world size from
# PMI_SIZE and the local rank (= the tile this rank drives) from PALS_LOCAL_RANKID.
#
# Written for Aurora from the oneCCL and PALS documentation; not yet run there. The CCL_* / FI_* values are
# starting points: check them against ALCF's current user guide for your frameworks module.
#PBS -N ring-attn-train
#PBS -j oe
set -euo pipefail
cd "${PBS_O_WORKDIR:-.}"
config=${CONFIG:-configs/aurora_multinode.yaml}

# A PyTorch >= 2.8 XPU build (it ships the xccl backend): e.g. `module load frameworks`, or your own venv.
# source /path/to/venv/bin/activate

NNODES=$(sort -u "$PBS_NODEFILE" | wc -l)
RANKS_PER_NODE=12
NRANKS=$((NNODES * RANKS_PER_NODE))

# torch.distributed rendezvous (its TCP store): the first node of the job.
export MASTER_ADDR=$(head -n 1 "$PBS_NODEFILE")
export MASTER_PORT=${MASTER_PORT:-29500}

# --- oneCCL (the xccl backend) -------------------------------------------------------------------------
# PALS starts the ranks through PMIx: tell oneCCL so it takes rank/size from the launcher, not its own.
export CCL_PROCESS_LAUNCHER=pmix
# Exchange oneCCL's startup addresses (its key-value store) over MPI rather than its own TCP sockets, which
# need open ports between compute nodes.
export CCL_KVS_MODE=mpi
# Cross-node transport through MPI (Cray MPICH on Slingshot), the path the ALCF frameworks are tested with.
export CCL_ATL_TRANSPORT=mpi
# Share GPU memory handles between the ranks of a node with pidfd (Linux >= 5.6) instead of Unix sockets.
export CCL_ZE_IPC_EXCHANGE=pidfd
# Warnings only; set CCL_LOG_LEVEL=info once to see which algorithms and transports oneCCL picked.
export CCL_LOG_LEVEL=${CCL_LOG_LEVEL:-warn}

# --- libfabric (Slingshot "cxi" provider) -------------------------------------------------------------------
export FI_PROVIDER=cxi
# Larger completion queues: at hundreds of ranks the default overflows during all-reduce bursts.
export FI_CXI_DEFAULT_CQ_SIZE=131072
# Track registered memory with userfaultfd: the default memhooks monitor can miss frees made by the GPU
# runtime, leaving stale registrations.
export FI_MR_CACHE_MONITOR=userfaultfd

# --- Level Zero ---------------------------------------------------------------------------------------------
# Each tile is its own device (the default on current drivers; set so the rank -> tile mapping never changes).
export ZE_FLAT_DEVICE_HIERARCHY=FLAT

# CPU threads: 102 usable cores per node / 12 ranks, rounded down.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

# Bind each rank to its own block of cores, away from the cores the OS services use on Aurora nodes.
CPU_BIND="list:1-8:9-16:17-24:25-32:33-40:41-48:53-60:61-68:69-76:77-84:85-92:93-100"

mpiexec -n "$NRANKS" --ppn "$RANKS_PER_NODE" --cpu-bind "$CPU_BIND" \
    python -m ring_flash_attn train --config "$config" --resume "$@"
