"""The check the GPU tests of packed batches share: every rank of a packed batch over the loopback."""

import itertools

import torch

from ring_flash_attn import ring_attention
from ring_flash_attn.comm.loopback import LoopbackComm
from tests.tolerances import FORWARD, GRADIENT, rel_err


def check_packed_ranks(layout, world_size, inputs, ref, dtype, label, **attention):
    """Each rank's ``ring_attention`` (causal, ``cu_seqlens`` of ``layout``, ``attention``'s other options) over
    the loopback on the packed batch ``inputs`` (q, k, v, dout: float64 ``[1, total, heads, d]`` drawn in
    ``dtype``): its out, LSE and dQ against the float64 oracle ``ref`` (tests.distributed.workers.packed_oracle's)
    within the tolerances of ``dtype``. ``label`` heads each rank's printed errors."""
    q, k, v, dout = inputs
    shard = lambda x, r, dim=1: layout.shard(x, r, world_size, dim)  # noqa: E731
    kv_by_rank = [torch.stack((shard(k, r), shard(v, r))).to(dtype) for r in range(world_size)]
    cu = torch.tensor([0, *itertools.accumulate(layout.seqlens_local)], dtype=torch.int32, device=q.device)
    for rank in range(world_size):
        ql = shard(q, rank).to(dtype).requires_grad_()
        out, lse = ring_attention(ql[0], kv_by_rank[rank][0][0], kv_by_rank[rank][1][0], variant=layout.base.name,
                                  causal=True, cu_seqlens=cu, comm=LoopbackComm(rank, kv_by_rank), **attention)
        out.backward(shard(dout, rank)[0].to(dtype))
        errors = (rel_err(out, shard(ref[0], rank)[0]), rel_err(lse, shard(ref[1], rank, 2)[0]),
                  rel_err(ql.grad[0], shard(ref[2], rank)[0]))
        print(*label, rank, [f"{e:.2e}" for e in errors])
        assert errors[0] <= FORWARD[dtype] and errors[1] <= FORWARD[torch.float32] and errors[2] <= GRADIENT[dtype]
