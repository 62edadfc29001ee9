"""The engine over the loopback communicator on CUDA against the float64 oracle.

The loopback copies K/V on a side stream while the kernels run; a missing
stream dependency or a buffer freed too early (the race the anchors describe)
would show here as an error above tolerance, varying from run to run.
"""

import pytest
import torch

from ring_flash_attn import ring_attention
from ring_flash_attn.comm.loopback import LoopbackComm
from ring_flash_attn.kernels import get_backend
from ring_flash_attn.ring.layouts import get_layout
from tests.tolerances import FORWARD, GRADIENT, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("variant,causal", [("ring", False), ("zigzag", True), ("stripe", True)])
def test_loopback_ring_matches_oracle(backend, variant, causal):
    world_size, seqlen, h, hk, d, dtype = 4, 4 * 512, 8, 2, 128, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2 ** 31 - 1, ()).item()))
    # Drawn in the low-precision dtype, so the oracle sees exactly the inputs the ring sees.
    q, dout = (torch.randn(1, seqlen, h, d, device="cuda", generator=g).to(dtype).double() for _ in range(2))
    k, v = (torch.randn(1, seqlen, hk, d, device="cuda", generator=g).to(dtype).double() for _ in range(2))
    oracle = get_backend("reference")
    kw = dict(scale=d ** -0.5, causal=causal)
    ref_out, ref_lse = oracle.forward(q, k, v, **kw)
    ref_dq = oracle.backward(dout, q, k, v, ref_out, ref_lse, **kw)[0]
    layout = get_layout(variant)
    shard = lambda x, r, dim=1: layout.shard(x, r, world_size, dim)  # noqa: E731
    kv_by_rank = [torch.stack((shard(k, r), shard(v, r))).to(dtype) for r in range(world_size)]
    for rank in range(world_size):
        ql = shard(q, rank).to(dtype).requires_grad_()
        out, lse = ring_attention(ql, kv_by_rank[rank][0], kv_by_rank[rank][1], variant=variant, causal=causal,
                                  backend=backend, comm=LoopbackComm(rank, kv_by_rank))
        out.backward(shard(dout, rank).to(dtype))
        assert rel_err(out, shard(ref_out, rank)) <= FORWARD[dtype], f"rank {rank} out"
        assert rel_err(lse, shard(ref_lse, rank, dim=2)) <= FORWARD[torch.float32], f"rank {rank} lse"
        assert rel_err(ql.grad, shard(ref_dq, rank)) <= GRADIENT[dtype], f"rank {rank} dq"
