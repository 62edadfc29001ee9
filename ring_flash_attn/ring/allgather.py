"""The all-gather schedule ("llama3" context parallelism).

Instead of passing K/V around a ring, every rank all-gathers the K/V of all
ranks, a chunk of ``heads_k_stride`` K/V heads at a time, and computes its
queries against the gathered sequence; the backward reduce-scatters dK/dV.
The gather of the next head chunk is issued before the current chunk's kernels
run, so it overlaps with compute; the reduce-scatter of a chunk overlaps with
the next chunk's backward. Memory for K/V grows with the world size (one
gathered chunk, two in flight) instead of staying flat as in the ring, in
exchange for collectives that interconnects run at full speed.

Exception safety as in the ring engine: a rank whose compute raised keeps making
every gather and reduce-scatter of the call, then all ranks learn of it and raise.

The same kernel backends, block tasks and float32 merge as the ring engine are
used; only the exchange differs. Tensors are packed sequences
``[1, total_tokens_local, heads, head_dim]`` and tasks index the gathered K/V
(``P * total_tokens_local`` rows, rank order).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist

from .. import agreement
from ..agreement import ComputeFailure
from ..comm.collectives import start_all_gather, wait_works
from ..kernels.base import KernelBackend
from ..merge import accumulator_dtype, new_accumulators
from ..validation import check_softmax_scale
from .batching import Call, keys_moved, share_rows, step_calls
from .engine import ContextParallelAttention, add_key_gradients, call_gradients, fold_call, kernel_kwargs
from .planner import PLAN_CACHES

# torch 2.13 renamed the tensor collectives (the old names warn on every first call of a process, on every
# rank); the torch versions before it have only the old names.
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class AllGatherPlan:
    tasks: Tuple[Call, ...]  # key ranges index the gathered K/V; small calls of one shape batched
    scale: float
    softcap: float
    backend: KernelBackend
    group: Any
    world_size: int
    heads_k_stride: int
    alibi_slopes: Optional[torch.Tensor] = None

    @property
    def groups(self) -> tuple:
        return (self.group,)

    def kernel_kwargs(self, task, q_heads: slice) -> dict:
        slopes = None if self.alibi_slopes is None else self.alibi_slopes[..., q_heads]
        return kernel_kwargs(task, self.scale, self.softcap, slopes)

    def forward(self, q, k, v):
        return allgather_forward(q, k, v, self)

    def backward(self, dout, q, k, v, out, lse):
        return allgather_backward(dout, q, k, v, out, lse, self)


class _Gathered:
    """One head chunk's K and V from every rank, gathered asynchronously into fresh buffers."""

    def __init__(self, k_chunk, v_chunk, plan: AllGatherPlan):
        self.k = torch.empty((plan.world_size * k_chunk.shape[0], *k_chunk.shape[1:]), dtype=k_chunk.dtype,
                             device=k_chunk.device)
        self.v = torch.empty_like(self.k)
        self._sources = (k_chunk, v_chunk)  # held until the gathers complete
        self._works = [start_all_gather(self.k, k_chunk, plan.group), start_all_gather(self.v, v_chunk, plan.group)]

    def wait(self):
        wait_works(self._works, self.k.device, "all-gather of K/V")
        self._works, self._sources = [], ()
        return self.k, self.v


def _head_chunks(heads: int, heads_k: int, stride: int):
    """(query-head slice, K/V-head slice) per chunk; each K/V head keeps its query-head group."""
    groups = heads // heads_k
    for h in range(0, heads_k, stride):
        yield slice(h * groups, (h + stride) * groups), slice(h, h + stride)


def _gather_chunk(k, v, kv_heads, plan):
    # [1, S, Hk, D] -> contiguous [S, stride, D]: the all-gather concatenates along dim 0.
    return _Gathered(k[0, :, kv_heads].contiguous(), v[0, :, kv_heads].contiguous(), plan)


def allgather_forward(q, k, v, plan: AllGatherPlan):
    out_acc, lse_acc = new_accumulators(q)
    chunks = list(_head_chunks(q.shape[2], k.shape[2], plan.heads_k_stride))
    pending = _gather_chunk(k, v, chunks[0][1], plan)
    failure = None
    for n, (q_heads, _) in enumerate(chunks):
        k_all, v_all = pending.wait()
        if n + 1 < len(chunks):
            pending = _gather_chunk(k, v, chunks[n + 1][1], plan)
        if failure is not None:
            continue  # keep gathering: the other ranks' all-gathers must stay matched
        try:
            for call in plan.tasks:
                fold_call(plan.backend, call, plan.kernel_kwargs(call, q_heads), q[:, :, q_heads],
                          k_all.unsqueeze(0), v_all.unsqueeze(0), out_acc[:, :, q_heads], lse_acc[:, q_heads])
        except BaseException as error:
            failure = ComputeFailure(error, f"forward head chunk {n}")
    agreement.finish(plan.group, failure, q.device, "all-gather forward")
    return out_acc.to(q.dtype), lse_acc


def allgather_backward(dout, q, k, v, out, lse, plan: AllGatherPlan):
    acc_dtype = accumulator_dtype(q.dtype)
    dq_acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=acc_dtype, device=k.device)
    dv = torch.empty_like(dk)
    chunks = list(_head_chunks(q.shape[2], k.shape[2], plan.heads_k_stride))
    pending = _gather_chunk(k, v, chunks[0][1], plan)
    in_flight = None  # at most one chunk's reduce-scatter at a time bounds memory to two gathered chunks
    failure = None
    for n, (q_heads, kv_heads) in enumerate(chunks):
        k_all, v_all = pending.wait()
        if n + 1 < len(chunks):
            pending = _gather_chunk(k, v, chunks[n + 1][1], plan)
        dk_all = torch.zeros(k_all.shape, dtype=acc_dtype, device=k.device)
        dv_all = torch.zeros_like(dk_all)
        if failure is None:
            try:
                for call in plan.tasks:
                    dk_blk, dv_blk = call_gradients(
                        plan.backend, call, plan.kernel_kwargs(call, q_heads), dout[:, :, q_heads], q[:, :, q_heads],
                        k_all.unsqueeze(0), v_all.unsqueeze(0), out[:, :, q_heads], lse[:, q_heads],
                        dq_acc[:, :, q_heads])
                    add_key_gradients(call, dk_blk, dv_blk, dk_all.unsqueeze(0), dv_all.unsqueeze(0))
            except BaseException as error:  # keep reduce-scattering (ours are partial sums) to the last chunk
                failure = ComputeFailure(error, f"backward head chunk {n}")
        dk_mine = torch.empty(dk_all.shape[0] // plan.world_size, *dk_all.shape[1:], dtype=acc_dtype,
                              device=k.device)
        dv_mine = torch.empty_like(dk_mine)
        works = [_reduce_scatter_tensor(dk_mine, dk_all, group=plan.group, async_op=True),
                 _reduce_scatter_tensor(dv_mine, dv_all, group=plan.group, async_op=True)]
        if in_flight is not None:
            _finish_scatter(in_flight, dk, dv)
        # The full-size sources stay referenced until their reduce-scatter is done.
        in_flight = (works, kv_heads, dk_mine, dv_mine, dk_all, dv_all)
    _finish_scatter(in_flight, dk, dv)
    agreement.finish(plan.group, failure, q.device, "all-gather backward")
    return dq_acc.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _finish_scatter(in_flight, dk, dv) -> None:
    works, kv_heads, dk_mine, dv_mine, _, _ = in_flight
    wait_works(works, dk.device, "reduce-scatter of dK/dV")
    dk[0, :, kv_heads] = dk_mine
    dv[0, :, kv_heads] = dv_mine


@lru_cache(maxsize=64)  # as ring/batching.step_calls: one batch, reused by its layers and its backward
def allgather_calls(layout, rank: int, world_size: int, seqlen_local: int, band, keep_positions: bool = False,
                    varlen: bool = False) -> Tuple[Call, ...]:
    """The ring's calls on every source rank (:func:`~ring_flash_attn.ring.batching.step_calls`: small blocks
    of one shape batched, or with ``varlen`` variable-length calls), with key rows moved into the gathered K/V."""
    calls = tuple(call for src in range(world_size) for call in keys_moved(
        step_calls(layout, rank, src, world_size, seqlen_local, band, keep_positions, varlen), src * seqlen_local))
    share_rows(calls)
    return calls


PLAN_CACHES.append(allgather_calls)


def allgather_attention(q, k, v, calls, *, kernel, softmax_scale, softcap, group, heads_k_stride, world_size,
                        alibi_slopes=None, shared=None):
    """Run the all-gather exchange for this rank's ``calls`` (blocks, or batches of them: ring/batching.py) on
    packed ``[1, T, H, D]`` tensors with the kernel backend ``kernel``, which the caller chose (from features
    every rank decides alike, so that all choose the same one) and planned ``calls`` for.
    ``shared``: what else the ranks must agree on (layout, causal, window, ...), as :func:`agreement.describe`
    keywords."""
    scale = check_softmax_scale(softmax_scale, q.shape[-1])
    plan = AllGatherPlan(tuple(calls), scale, softcap, kernel, group, world_size, heads_k_stride, alibi_slopes)
    agreement.agree(group, agreement.describe(
        q, k, v, exchange="allgather", softmax_scale=scale, softcap=softcap, heads_k_stride=heads_k_stride,
        alibi_slopes=None if alibi_slopes is None else tuple(alibi_slopes.shape), **(shared or {})), q.device)
    return ContextParallelAttention.apply(q, k, v, plan)
