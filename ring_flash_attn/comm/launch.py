"""Rank, world size and local rank from whichever launcher started us.

Read in this order: torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), Open MPI
(``OMPI_COMM_WORLD_RANK``/``_SIZE``/``_LOCAL_RANK``), PMIx (``PMIX_RANK``, with
``PMI_SIZE`` or ``WORLD_SIZE``), MPICH/Intel MPI/PALS (``PMI_RANK``, ``PMI_SIZE``,
``PALS_LOCAL_RANKID`` or ``MPI_LOCALRANKID``), Slurm (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID``). Without any, a single process (rank 0 of 1).

The rendezvous address comes from ``MASTER_ADDR`` (default ``127.0.0.1``) and
``MASTER_PORT`` (default ``29500``); under MPI set ``MASTER_ADDR`` to the first
node's hostname (the launch/ scripts do).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = "29500"

# Whether this process initialised the default process group (see cli.run: how such a process exits).
_started = False


def process_group_started() -> bool:
    """True once :func:`init_distributed` has initialised a process group in this process (destroyed or not)."""
    return _started


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    launcher: str


def _first(env: Mapping[str, str], *names: str) -> Optional[int]:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}: expected an integer, got {value!r}") from None
    return None


def detect_launch(env: Optional[Mapping[str, str]] = None) -> LaunchInfo:
    env = os.environ if env is None else env
    candidates = (
        ("torchrun", ("RANK",), ("WORLD_SIZE",), ("LOCAL_RANK",)),
        ("openmpi", ("OMPI_COMM_WORLD_RANK",), ("OMPI_COMM_WORLD_SIZE",), ("OMPI_COMM_WORLD_LOCAL_RANK",)),
        ("pmix", ("PMIX_RANK",), ("PMI_SIZE", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"), ("PALS_LOCAL_RANKID", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK")),
        ("pmi", ("PMI_RANK",), ("PMI_SIZE",), ("PALS_LOCAL_RANKID", "MPI_LOCALRANKID")),
        ("slurm", ("SLURM_PROCID",), ("SLURM_NTASKS",), ("SLURM_LOCALID",)),
    )
    for launcher, rank_vars, size_vars, local_vars in candidates:
        rank = _first(env, *rank_vars)
        if rank is None:
            continue
        world = _first(env, *size_vars)
        if world is None:
            raise ValueError(f"launcher {launcher}: {rank_vars[0]} is set but none of {size_vars} is")
        local = _first(env, *local_vars)
        if not 0 <= rank < world:
            raise ValueError(f"launcher {launcher}: rank {rank} is outside world size {world}")
        return LaunchInfo(rank, world, rank if local is None else local, launcher)
    return LaunchInfo(0, 1, 0, "none")


def init_distributed(device_type: Optional[str] = None, backend: Optional[str] = None,
                     timeout_s: float = 600.0):
    """Initialise the default process group from the launcher's environment.

    Returns ``(LaunchInfo, torch.device)``. Sets the current device to the local
    rank on accelerators. Idempotent: an initialised group is reused.
    """
    import torch
    import torch.distributed as dist

    from .backend import choose_backend, default_device_type

    info = detect_launch()
    device_type = device_type or default_device_type()
    if device_type == "cpu":
        device = torch.device("cpu")
    else:
        device = torch.device(device_type, info.local_rank)
        getattr(torch, device_type).set_device(device)
    global _started
    if not dist.is_initialized():
        _started = True
        os.environ.setdefault("MASTER_ADDR", DEFAULT_MASTER_ADDR)
        os.environ.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)
        timeout = timedelta(seconds=timeout_s)
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if info.launcher == "torchrun" and attempt > 0:
            # After a torchrun restart every attempt gets the same store, and env:// (torch 2.13) does not
            # namespace its keys by attempt: ranks would read the dead attempt's gloo addresses and fail to
            # connect. A per-attempt prefix keeps attempts apart. (The first attempt takes plain env://.)
            hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and info.rank == 0
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world_size,
                                  is_master=hosts_store, timeout=timeout, multi_tenant=True)
            dist.init_process_group(choose_backend(device_type, backend),
                                    store=dist.PrefixStore(f"ring_flash_attn/attempt_{attempt}", store),
                                    rank=info.rank, world_size=info.world_size, timeout=timeout)
        else:
            dist.init_process_group(backend=choose_backend(device_type, backend), rank=info.rank,
                                    world_size=info.world_size, timeout=timeout, init_method="env://")
    return info, device
