"""The data-parallel x context-parallel mesh, and the gradient all-reduce that goes with it.

Ranks form a ``(dp, cp)`` grid, CP innermost, so the CP ranks of one replica
are neighbours (same node, fast links). Each sequence is split over the ``cp``
group; each DP replica reads different sequences.

The model is replicated on every rank, CP ranks included: each rank's gradient
holds only the contribution of its own tokens (ring attention's backward has
already sent K/V gradients back to the ranks that own those tokens). The loss
each rank back-propagates is its token-loss *sum* divided by the token count of
the whole step, so a plain SUM all-reduce over the whole world gives exactly the
gradient of the global mean loss, on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, List

import torch
import torch.distributed as dist
from torch import nn

# Gradients travel in flat buckets: a few large all-reduces instead of one per parameter.
BUCKET_BYTES = 32 * 1024 * 1024


@dataclass
class Mesh:
    device_mesh: object  # torch.distributed.device_mesh.DeviceMesh, dims ("dp", "cp")
    dp_size: int
    cp_size: int
    dp_rank: int
    cp_rank: int

    @property
    def cp_group(self) -> dist.ProcessGroup:
        return self.device_mesh.get_group("cp")


def build_mesh(device_type: str, dp_size: int, cp_size: int, timeout_s: float) -> Mesh:
    """The ``(dp, cp)`` mesh over the default group, every sub-group with the run's timeout.

    ``init_device_mesh`` would create its sub-groups with the backend's default timeout (30 minutes for gloo)
    instead of the default group's, so a dead peer inside a CP ring would stall the run for half an hour. The
    sub-groups are made here with the configured timeout and handed to ``DeviceMesh.from_group``.
    """
    from torch.distributed.device_mesh import DeviceMesh

    rank = dist.get_rank()
    grid = torch.arange(dp_size * cp_size).view(dp_size, cp_size)
    timeout = timedelta(seconds=timeout_s)
    mine = {}
    # Every rank must create every group, in the same order.
    for name, rows in (("cp", grid.tolist()), ("dp", grid.t().tolist())):
        for ranks in rows:
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine[name] = group
    device_mesh = DeviceMesh.from_group([mine["dp"], mine["cp"]], device_type, mesh=grid,
                                        mesh_dim_names=("dp", "cp"))
    return Mesh(device_mesh, dp_size, cp_size, device_mesh.get_local_rank("dp"), device_mesh.get_local_rank("cp"))


def broadcast_parameters(model: nn.Module) -> None:
    """Make every rank's weights rank 0's: replicas must start identical even where initialisation differs."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)


def _buckets(tensors: List[torch.Tensor]) -> Iterable[List[torch.Tensor]]:
    bucket, size = [], 0
    for tensor in tensors:
        bucket.append(tensor)
        size += tensor.numel() * tensor.element_size()
        if size >= BUCKET_BYTES:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def all_reduce_gradients(model: nn.Module) -> None:
    """Sum every parameter's gradient over the whole world (see the module docstring for why a plain sum)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # a parameter this rank's tokens did not reach still takes part in the sum
            p.grad = torch.zeros_like(p)
    for bucket in _buckets([p.grad for p in params]):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        offset = 0
        for grad in bucket:
            grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
            offset += grad.numel()
