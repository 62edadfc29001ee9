"""The ``sycl`` backend driven by the ring engine (forward_accumulate, backward, autograd) on one process."""

from __future__ import annotations

import zlib

import pytest
import torch

from ring_flash_attn.comm.loopback import LoopbackComm
from ring_flash_attn.comm.ring import SingleProcessFinish
from ring_flash_attn.functional import ring_attention
from ring_flash_attn.kernels import get_backend
from ring_flash_attn.ring.layouts import get_layout
from tests.tolerances import FORWARD, GRADIENT, rel_err

pytestmark = pytest.mark.usefixtures("sycl_cpu_build")


class _Done:
    def wait(self):
        pass


class EchoComm(SingleProcessFinish):
    """A rank of a ring of ``world_size`` in one process: each exchange hands the rank its own buffer back.

    Not the real ring's data (see test_true_ring_over_loopback for that), but every step
    still plans its own (query, key, mask) tasks for another source rank, and it works
    for float32 and for dK/dV, so a backend must reproduce what the float64 reference
    computes through the same engine.
    """

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def exchange(self, send, recv, kind="kv"):
        recv.copy_(send)
        return _Done()


@pytest.mark.parametrize("variant, window", [("ring", (-1, -1)), ("zigzag", (-1, -1)), ("zigzag", (20, -1)),
                                             ("stripe", (-1, -1))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ring_engine_with_sycl_matches_reference(variant, window, dtype):
    torch.manual_seed(zlib.crc32(f"{variant}-{window}-{dtype}".encode()))
    batch, seqlen_local, heads, heads_k, head_dim = 2, 24, 4, 2, 64
    q = torch.randn(batch, seqlen_local, heads, head_dim, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, seqlen_local, heads_k, head_dim, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, seqlen_local, heads_k, head_dim, dtype=dtype, requires_grad=True)
    dout = torch.randn_like(q)

    def run(backend, inputs):
        out, lse = ring_attention(*inputs, variant=variant, causal=True, window_size=window, backend=backend,
                                  comm=EchoComm(rank=1, world_size=3))
        grads = torch.autograd.grad(out, inputs, dout.to(out.dtype))
        return out, lse, grads

    out, lse, grads = run("sycl", (q, k, v))
    ref_inputs = tuple(x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse, ref_grads = run("reference", ref_inputs)
    assert rel_err(out, ref_out) <= FORWARD[dtype]
    assert rel_err(lse, ref_lse) <= FORWARD[dtype]
    for grad, ref_grad in zip(grads, ref_grads):
        assert rel_err(grad, ref_grad) <= GRADIENT[dtype]


@pytest.mark.parametrize("variant", ["ring", "zigzag"])
def test_packed_variable_length_sequences(variant):
    """cu_seqlens: the engine calls the kernel per sequence block; no attention crosses a boundary."""
    torch.manual_seed(zlib.crc32(f"varlen-{variant}".encode()))
    total, heads, heads_k, head_dim = 30, 2, 1, 128
    cu_seqlens = torch.tensor([0, 10, 24, 30], dtype=torch.int32)
    q = torch.randn(total, heads, head_dim, requires_grad=True)
    k = torch.randn(total, heads_k, head_dim, requires_grad=True)
    v = torch.randn(total, heads_k, head_dim, requires_grad=True)
    dout = torch.randn_like(q)

    def run(backend, inputs):
        out, lse = ring_attention(*inputs, variant=variant, causal=True, cu_seqlens=cu_seqlens, backend=backend,
                                  comm=EchoComm(rank=0, world_size=2))
        return out, lse, torch.autograd.grad(out, inputs, dout.to(out.dtype))

    out, lse, grads = run("sycl", (q, k, v))
    ref_out, ref_lse, ref_grads = run("reference", tuple(x.detach().double().requires_grad_() for x in (q, k, v)))
    assert rel_err(out, ref_out) <= FORWARD[torch.float32]
    assert rel_err(lse, ref_lse) <= FORWARD[torch.float32]
    for grad, ref_grad in zip(grads, ref_grads):
        assert rel_err(grad, ref_grad) <= GRADIENT[torch.float32]


@pytest.mark.parametrize("variant, causal, window", [("ring", False, (-1, -1)), ("zigzag", True, (-1, -1)),
                                                     ("stripe", True, (-1, -1)), ("zigzag", True, (30, -1))])
def test_true_ring_over_loopback(variant, causal, window):
    """Each rank of a 3-rank ring (the loopback delivers the true K/V blocks) against full attention in float64.

    out, lse and dq are exact under the loopback; its dK/dV exchanges are not (see comm/loopback.py).
    """
    torch.manual_seed(zlib.crc32(f"true-ring-{variant}-{window}".encode()))
    world_size, seqlen, heads, heads_k, head_dim, dtype = 3, 48, 4, 2, 64, torch.bfloat16
    # Drawn in bfloat16, so the oracle sees exactly the inputs the ring sees.
    q, dout = (torch.randn(2, seqlen, heads, head_dim).to(dtype).double() for _ in range(2))
    k, v = (torch.randn(2, seqlen, heads_k, head_dim).to(dtype).double() for _ in range(2))
    oracle = get_backend("reference")
    mask = dict(scale=head_dim ** -0.5, causal=causal, window=window)
    ref_out, ref_lse = oracle.forward(q, k, v, **mask)
    ref_dq = oracle.backward(dout, q, k, v, ref_out, ref_lse, **mask)[0]
    layout = get_layout(variant)
    shard = lambda x, r, dim=1: layout.shard(x, r, world_size, dim)  # noqa: E731
    kv_by_rank = [torch.stack((shard(k, r), shard(v, r))).to(dtype) for r in range(world_size)]
    for rank in range(world_size):
        q_local = shard(q, rank).to(dtype).requires_grad_()
        out, lse = ring_attention(q_local, kv_by_rank[rank][0], kv_by_rank[rank][1], variant=variant, causal=causal,
                                  window_size=window, backend="sycl", comm=LoopbackComm(rank, kv_by_rank))
        out.backward(shard(dout, rank).to(dtype))
        assert rel_err(out, shard(ref_out, rank)) <= FORWARD[dtype], f"rank {rank} out"
        assert rel_err(lse, shard(ref_lse, rank, dim=2)) <= FORWARD[torch.float32], f"rank {rank} lse"
        assert rel_err(q_local.grad, shard(ref_dq, rank)) <= GRADIENT[dtype], f"rank {rank} dq"
