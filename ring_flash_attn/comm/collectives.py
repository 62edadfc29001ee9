"""Collectives used around the ring: asynchronous all-gathers with a bounded wait on CPU, and a differentiable
gather of per-rank slices back into a sequence."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .. import agreement
from . import in_flight
from ..tracing import outside_graphs
from ..validation import group_rank_and_size


# torch 2.13's names; the older ones print a FutureWarning on every rank there.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def start_all_gather(output: torch.Tensor, local: torch.Tensor, group: Optional[dist.ProcessGroup] = None):
    """Start gathering every rank's ``local`` into ``output`` (concatenated along dim 0, group-rank order);
    returns the work to pass to :func:`wait_works`. Both tensors must stay alive until then."""
    return _all_gather_tensor(output, local, group=group, async_op=True)


def wait_works(works, device: torch.device, what: str) -> None:
    """Wait for collectives in flight: bounded on CPU (gloo blocks in wait anyway, and a rank that never
    arrives becomes an error naming ``what`` within seconds); stream-ordered on accelerators."""
    if device.type == "cpu":
        agreement.wait_bounded(works, what)
    else:
        for work in works:
            work.wait()


class _AllGatherSequence(torch.autograd.Function):
    """Every rank's ``[batch, seqlen_local, ...]`` slice, concatenated along dim 1 in group-rank order.

    Not torch.distributed.nn.functional.all_gather: on gloo its backward fails for a group that is not the
    whole world (it passes group ranks where global ranks are expected), and it is deprecated. The backward
    sums every rank's gradient with an all-reduce (gloo has no reduce-scatter) and keeps this rank's part.
    """

    @staticmethod
    def forward(ctx, local, group, rank, world_size):
        ctx.group, ctx.rank, ctx.seqlen_local = group, rank, local.shape[1]
        shards = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(shards, local.contiguous(), group=group)
        return torch.cat(shards, dim=1)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        with in_flight.one_call_at_a_time((ctx.group,), "gather_sequence's backward"):
            dist.all_reduce(grad, group=ctx.group)
        start = ctx.rank * ctx.seqlen_local
        return grad[:, start:start + ctx.seqlen_local], None, None, None


@outside_graphs
def all_gather_sequence(local: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Concatenate every rank's ``[batch, seqlen_local, ...]`` along dim 1 (group-rank order); differentiable."""
    rank, world_size = group_rank_and_size(group)
    with in_flight.one_call_at_a_time((group,), "gather_sequence"):
        # Slices of different shapes would abort the process inside gloo; a rank without a graph would skip the
        # backward's all-reduce the others wait in.
        agreement.agree(group, (("shape", tuple(local.shape)), ("dtype", local.dtype),
                                ("device type", local.device.type),
                                ("requires_grad", torch.is_grad_enabled() and local.requires_grad)),
                        local.device, kind="gather sequence")
        return _AllGatherSequence.apply(local, group, rank, world_size)
