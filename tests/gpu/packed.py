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


def check_llama3_pieces(seqlens, world_size, inputs, ref, dtype, backend, label):
    """Each rank's contiguous piece of the packed batch ``inputs`` (q, k, v, dout: float64 ``[1, total, heads,
    d]`` drawn in ``dtype``; causal documents ``seqlens``) under the llama3 exchange, planned as
    llama3_flash_attn_varlen_func plans it (llama3._llama3_calls: variable-length calls where ``backend`` serves
    them); checked by :func:`check_gathered_ranks`. Returns how many variable-length calls were made."""
    from ring_flash_attn import llama3_flash_attn_prepare_cu_seqlens
    from ring_flash_attn.kernels.mask import Band
    from ring_flash_attn.llama3 import _llama3_calls

    piece = inputs[0].shape[1] // world_size
    cu = torch.tensor([0, *itertools.accumulate(seqlens)], dtype=torch.int32)

    def calls_of(rank, varlen):
        cu_q, cu_k, _, _, local_k_slice = llama3_flash_attn_prepare_cu_seqlens(cu, True, rank, world_size)
        return _llama3_calls(tuple(cu_q.tolist()), tuple(cu_k.tolist()), local_k_slice.start, rank * piece,
                             Band.from_kernel_args(True, (-1, -1)), False, varlen)

    shard = lambda x, rank, dim=1: x.narrow(dim, rank * piece, piece)  # noqa: E731
    return check_gathered_ranks(calls_of, shard, world_size, inputs, ref, dtype, backend, label)


def check_allgather_ranks(layout, world_size, inputs, ref, dtype, backend, label):
    """As :func:`check_llama3_pieces` for the load-balanced all-gather exchange (``ring_attention(
    exchange="allgather")`` on the packed ``layout``): each rank's calls are ring/allgather.allgather_calls'."""
    from ring_flash_attn.kernels.mask import Band
    from ring_flash_attn.ring.allgather import allgather_calls

    total_local = sum(layout.seqlens_local)
    calls_of = lambda rank, varlen: allgather_calls(  # noqa: E731
        layout, rank, world_size, total_local, Band.from_kernel_args(True, (-1, -1)), False, varlen)
    shard = lambda x, rank, dim=1: layout.shard(x, rank, world_size, dim)  # noqa: E731
    return check_gathered_ranks(calls_of, shard, world_size, inputs, ref, dtype, backend, label)


def check_gathered_ranks(calls_of, shard, world_size, inputs, ref, dtype, backend, label):
    """Every rank's all-gather calls (``calls_of(rank, varlen)``; ``shard(x, rank, dim)``: its rows of a
    full-sequence tensor) run through the engine's per-call steps (fold_call, call_gradients,
    add_key_gradients) on the gathered K/V, built here from every rank's rows in rank order (what the all-gather
    hands every rank, so no process group is needed). out, LSE and dQ per rank, and dK/dV summed over the ranks,
    against the float64 oracle ``ref`` within the tolerances of ``dtype``. Returns how many variable-length
    calls were made."""
    from ring_flash_attn.kernels import Features, get_backend
    from ring_flash_attn.merge import accumulator_dtype, new_accumulators
    from ring_flash_attn.ring.batching import VarlenBatch
    from ring_flash_attn.ring.engine import add_key_gradients, call_gradients, fold_call, kernel_kwargs

    q, k, v, dout = inputs
    kernel, scale = get_backend(backend), q.shape[-1] ** -0.5
    varlen = kernel.serves_varlen(Features(q.device.type, dtype, q.shape[-1]))
    k_all, v_all = (torch.cat([shard(t, r) for r in range(world_size)], dim=1).to(dtype) for t in (k, v))
    dk_all, dv_all = (torch.zeros(k_all.shape, dtype=accumulator_dtype(dtype), device=q.device) for _ in range(2))
    made = 0
    for rank in range(world_size):
        calls = calls_of(rank, varlen)
        made += sum(isinstance(call, VarlenBatch) for call in calls)
        ql, doutl = shard(q, rank).to(dtype), shard(dout, rank).to(dtype)
        out_acc, lse = new_accumulators(ql)
        for call in calls:
            fold_call(kernel, call, kernel_kwargs(call, scale, 0.0, None), ql, k_all, v_all, out_acc, lse)
        out = out_acc.to(dtype)
        dq_acc = torch.zeros_like(out_acc)
        for call in calls:
            dk, dv = call_gradients(kernel, call, kernel_kwargs(call, scale, 0.0, None), doutl, ql, k_all, v_all,
                                    out, lse, dq_acc)
            add_key_gradients(call, dk, dv, dk_all, dv_all)
        errors = (rel_err(out, shard(ref[0], rank)), rel_err(lse, shard(ref[1], rank, 2)),
                  rel_err(dq_acc, shard(ref[2], rank)))
        print(*label, rank, [f"{e:.2e}" for e in errors])
        assert errors[0] <= FORWARD[dtype] and errors[1] <= FORWARD[torch.float32] and errors[2] <= GRADIENT[dtype]
    rows = k_all.shape[1] // world_size  # rank r's rows of the gathered K/V are its own shard
    for name, got, want in (("dk", dk_all, ref[3]), ("dv", dv_all, ref[4])):
        error = max(rel_err(got[:, r * rows:(r + 1) * rows], shard(want, r)) for r in range(world_size))
        print(*label, name, f"{error:.2e}")
        assert error <= GRADIENT[dtype], (name, error)
    return made
