"""The device meshes of a run: data x context for the batch, and the one FSDP shards parameters over.

Ranks form a ``(dp, cp)`` grid, CP innermost, so the CP ranks of one replica
are neighbours (same node, fast links). Each sequence is split over the ``cp``
group; each DP replica reads different sequences.

Context-parallel ranks hold the same model replica as much as data-parallel
ones do, so parameters, gradients and optimizer state are sharded over the
whole ``dp x cp`` grid (the flattened mesh), as torchtitan does. With hybrid
sharding (``parallel.fsdp_replicate = R``) the grid is cut into R groups of
consecutive ranks (a node each, when ranks are numbered node by node):
parameters are sharded within a group and replicated across groups, so the
all-gathers stay on the fast links inside a node.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, List

import torch
import torch.distributed as dist


@dataclass
class Mesh:
    device_mesh: object  # torch.distributed.device_mesh.DeviceMesh, dims ("dp", "cp")
    shard_mesh: object   # the DeviceMesh FSDP uses: ("shard",) or ("replicate", "shard") for hybrid sharding
    dp_size: int
    cp_size: int
    dp_rank: int
    cp_rank: int

    @property
    def cp_group(self) -> dist.ProcessGroup:
        return self.device_mesh.get_group("cp")


def _groups(named_rows: Dict[str, List[List[int]]], timeout_s: float) -> Dict[str, dist.ProcessGroup]:
    """For each name, the group among ``rows`` holding this rank; every rank creates every group, in order.

    ``init_device_mesh`` would create its sub-groups with the backend's default timeout (30 minutes for gloo)
    instead of the default group's, so a dead peer inside a CP ring would stall the run for half an hour. The
    sub-groups are made here with the configured timeout and handed to ``DeviceMesh.from_group``.
    """
    rank, timeout, mine = dist.get_rank(), timedelta(seconds=timeout_s), {}
    for name, rows in named_rows.items():
        for ranks in rows:
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine[name] = group
    return mine


def build_mesh(device_type: str, dp_size: int, cp_size: int, timeout_s: float, fsdp_replicate: int = 1) -> Mesh:
    """The ``(dp, cp)`` mesh and the FSDP mesh over the default group, every sub-group with the run's timeout."""
    from torch.distributed.device_mesh import DeviceMesh

    world = dp_size * cp_size
    grid = torch.arange(world).view(dp_size, cp_size)
    mine = _groups({"cp": grid.tolist(), "dp": grid.t().tolist()}, timeout_s)
    device_mesh = DeviceMesh.from_group([mine["dp"], mine["cp"]], device_type, mesh=grid,
                                        mesh_dim_names=("dp", "cp"))
    if fsdp_replicate == 1:
        shard_mesh = DeviceMesh.from_group(dist.group.WORLD, device_type, mesh_dim_names=("shard",))
    else:
        blocks = torch.arange(world).view(fsdp_replicate, world // fsdp_replicate)
        hybrid = _groups({"shard": blocks.tolist(), "replicate": blocks.t().tolist()}, timeout_s)
        shard_mesh = DeviceMesh.from_group([hybrid["replicate"], hybrid["shard"]], device_type, mesh=blocks,
                                           mesh_dim_names=("replicate", "shard"))
    return Mesh(device_mesh, shard_mesh, dp_size, cp_size, device_mesh.get_local_rank("dp"),
                device_mesh.get_local_rank("cp"))
