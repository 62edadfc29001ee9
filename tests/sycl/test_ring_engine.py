"""The ``sycl`` backend driven by the ring engine (forward_accumulate, backward, autograd) on one process."""

from __future__ import annotations

import zlib

import pytest
import torch

from ring_flash_attn.functional import ring_attention
from tests.tolerances import FORWARD, GRADIENT, rel_err

pytestmark = pytest.mark.usefixtures("sycl_cpu_build")


class _Done:
    def wait(self):
        pass


class LoopbackComm:
    """A rank of a ring of ``world_size`` in one process: each exchange hands the rank its own buffer back.

    Not the real ring's data, but every step still plans its own (query, key, mask) tasks
    for another source rank, so a backend must reproduce what the float64 reference
    computes through the same engine.
    """

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def exchange(self, send, recv):
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
                                  comm=LoopbackComm(rank=1, world_size=3))
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
                                  comm=LoopbackComm(rank=0, world_size=2))
        return out, lse, torch.autograd.grad(out, inputs, dout.to(out.dtype))

    out, lse, grads = run("sycl", (q, k, v))
    ref_out, ref_lse, ref_grads = run("reference", tuple(x.detach().double().requires_grad_() for x in (q, k, v)))
    assert rel_err(out, ref_out) <= FORWARD[torch.float32]
    assert rel_err(lse, ref_lse) <= FORWARD[torch.float32]
    for grad, ref_grad in zip(grads, ref_grads):
        assert rel_err(grad, ref_grad) <= GRADIENT[torch.float32]
