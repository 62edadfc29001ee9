"""The ring backward with each block's call split over groups of K/V heads (RING_FLASH_ATTN_BACKWARD_HEAD_CHUNKS):
heads are independent, so every gradient equals the unsplit backward's bit for bit (one rank's schedule over the
loopback, fresh inputs), and a real ring of ranks matches the float64 oracle in out, LSE, dQ, dK and dV."""

import os

import pytest
import torch

from ring_flash_attn import ring_attention, usp_attention
from ring_flash_attn.comm.loopback import LoopbackComm
from ring_flash_attn.kernels import get_backend
from ring_flash_attn.ring.layouts import get_layout
from ring_flash_attn.validation import BACKWARD_HEAD_CHUNKS_ENV
from tests.distributed.harness import run_world
from tests.distributed.workers import ring_errors
from tests.tolerances import GRADIENT

SEED = int.from_bytes(os.urandom(4), "little")
P = 4


def _loopback_grads(variant, causal, dtype, backend, seed, chunks, monkeypatch):
    """out, lse, dq, dk, dv of rank 1's schedule over the loopback, the backward split into ``chunks``; and how
    many backward kernel calls it made."""
    monkeypatch.setenv(BACKWARD_HEAD_CHUNKS_ENV, str(chunks))
    kernel = get_backend(backend)
    calls = []
    monkeypatch.setattr(kernel, "backward", lambda *args, _backward=kernel.backward, **kwargs: calls.append(1)
                        or _backward(*args, **kwargs))
    g = torch.Generator().manual_seed(seed)
    b, s, h, hk, d = 1, 32, 8, 4, 16
    q, dout = (torch.randn(b, s, h, d, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(b, s, hk, d, generator=g).to(dtype) for _ in range(2))
    layout = get_layout(variant)
    kv_by_rank = [torch.stack((layout.shard(k, r, P), layout.shard(v, r, P))) for r in range(P)]
    ql, kl, vl = (layout.shard(t, 1, P).requires_grad_() for t in (q, k, v))
    out, lse = ring_attention(ql, kl, vl, variant=variant, causal=causal, backend=backend,
                              comm=LoopbackComm(1, kv_by_rank))
    out.backward(layout.shard(dout, 1, P))
    return (out, lse, ql.grad, kl.grad, vl.grad), len(calls)


@pytest.mark.parametrize("variant, causal", [("ring", False), ("zigzag", True), ("stripe", True)])
@pytest.mark.parametrize("dtype, backend", [(torch.float64, "reference"), (torch.float32, "sdpa"),
                                            (torch.bfloat16, "sdpa")])
@pytest.mark.parametrize("chunks", [2, 4])
def test_split_backward_equals_the_whole_one_bitwise(variant, causal, dtype, backend, chunks, monkeypatch):
    whole, whole_calls = _loopback_grads(variant, causal, dtype, backend, SEED, 1, monkeypatch)
    split, split_calls = _loopback_grads(variant, causal, dtype, backend, SEED, chunks, monkeypatch)
    assert whole_calls > 0 and split_calls == chunks * whole_calls, (whole_calls, split_calls)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), whole, split):
        assert torch.equal(a, b), (name, (a.double() - b.double()).abs().max().item(), SEED)


@pytest.mark.parametrize("value", ["3", "0", "-2", "two"])
def test_a_chunk_count_that_does_not_divide_the_kv_heads_is_refused(value, monkeypatch):
    monkeypatch.setenv(BACKWARD_HEAD_CHUNKS_ENV, value)
    q, k = torch.randn(1, 8, 8, 16), torch.randn(1, 8, 4, 16)
    kv = [torch.stack((k, k))] * 2
    with pytest.raises(ValueError, match=rf"^{BACKWARD_HEAD_CHUNKS_ENV}: expected a positive integer dividing the "
                                         rf"K/V heads \(4\), got '{value}'$"):
        ring_attention(q, k, k, comm=LoopbackComm(0, kv))
    with pytest.raises(ValueError, match=rf"^{BACKWARD_HEAD_CHUNKS_ENV}: expected a positive integer dividing"):
        usp_attention(q, k, k, ulysses_group=None, ring_group=None)  # the ring alone on one rank


CASES = [dict(variant=variant, causal=causal, dtype="float64", backend="reference", batch=2, seqlen=4 * P, heads=8,
              heads_k=4, head_dim=8, seed=SEED + n)
         for n, (variant, causal) in enumerate([("ring", False), ("zigzag", True), ("stripe", True)])]


def test_split_backward_over_gloo_ranks_matches_the_float64_oracle(monkeypatch):
    monkeypatch.setenv(BACKWARD_HEAD_CHUNKS_ENV, "2")
    for rank, errors in enumerate(run_world(P, ring_errors, CASES, timeout_s=120)):
        for case, error in zip(CASES, errors):
            assert all(e <= GRADIENT[torch.float64] for e in error.values()), (rank, case, error)
