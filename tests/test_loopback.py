"""One rank's schedule through the loopback communicator == the same rank in a real gloo ring, bit for bit.

The loopback hands rank r, at each K/V exchange, the block its predecessor
would have sent; the engine and kernels are the same, so out, LSE and dQ must
be identical (dK/dV are not: the loopback's dK/dV exchange is a stand-in).
"""

import io
import os

import pytest
import torch

from ring_flash_attn import ring_attention
from ring_flash_attn.comm.loopback import LoopbackComm
from ring_flash_attn.ring.layouts import get_layout
from tests.distributed.harness import run_world

SEED = int.from_bytes(os.urandom(4), "little")
WORLD_SIZE = 3
# (variant, causal, dtype): float32 too, since exchanges are told apart by their kind, not their dtype.
SCHEDULES = (("ring", False, torch.bfloat16), ("zigzag", True, torch.bfloat16), ("zigzag", True, torch.float32))


def _inputs(seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    b, s, h, hk, d = 1, 36, 4, 2, 16  # 36 splits into 2P chunks for P = 3
    q, dout = (torch.randn(b, s, h, d, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(b, s, hk, d, generator=g).to(dtype) for _ in range(2))
    return q, k, v, dout


def _run_rank(rank, world_size, variant, causal, dtype, seed, comm=None):
    """out, lse, dq of one rank; ``comm=None`` uses the process group."""
    layout = get_layout(variant)
    q, k, v, dout = (layout.shard(x, rank, world_size) for x in _inputs(seed, dtype))
    q.requires_grad_()
    out, lse = ring_attention(q, k, v, variant=variant, causal=causal, backend="sdpa", comm=comm)
    out.backward(dout)
    return out.detach(), lse, q.grad


def _gloo_rank(rank, world_size, schedules, seed):
    # As bytes: tensors sent through a multiprocessing queue live in the sender's shared memory,
    # which is gone once this rank exits.
    buffer = io.BytesIO()
    torch.save([_run_rank(rank, world_size, variant, causal, dtype, seed) for variant, causal, dtype in schedules],
               buffer)
    return buffer.getvalue()


def test_loopback_equals_gloo_ring_bitwise():
    gloo = [torch.load(io.BytesIO(data)) for data in run_world(WORLD_SIZE, _gloo_rank, SCHEDULES, SEED)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the gloo workers
    try:
        for n, (variant, causal, dtype) in enumerate(SCHEDULES):
            layout = get_layout(variant)
            _, k, v, _ = _inputs(SEED, dtype)
            kv_by_rank = [torch.stack((layout.shard(k, r, WORLD_SIZE), layout.shard(v, r, WORLD_SIZE)))
                          for r in range(WORLD_SIZE)]
            for rank in range(WORLD_SIZE):
                got = _run_rank(rank, WORLD_SIZE, variant, causal, dtype, SEED, comm=LoopbackComm(rank, kv_by_rank))
                for name, a, b in zip(("out", "lse", "dq"), got, gloo[rank][n]):
                    assert torch.equal(a, b), f"{variant} {dtype} rank {rank}: {name} differs from the gloo run"
    finally:
        torch.set_num_threads(threads)


def test_loopback_rejects_unknown_exchange_kind():
    kv = torch.zeros(2, 1, 4, 1, 8)
    with pytest.raises(ValueError, match="kind: expected 'kv' or 'grad', got 'kv_and_more'"):
        LoopbackComm(0, [kv, kv]).exchange(kv, torch.empty_like(kv), kind="kv_and_more")
