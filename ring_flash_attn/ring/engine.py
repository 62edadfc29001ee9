"""The ring engine: forward and backward for any layout, over any ring communicator.

Forward, at step t (rank r holds the K/V of rank r - t):
  1. start passing the K/V buffer to r + 1 and receiving r - 1's into the other buffer;
  2. fold every kernel call the planner lists into the float32 (out, LSE) accumulators;
  3. wait, swap the two buffers.
Backward, same ring, with the GLOBAL out/LSE saved by the forward:
  1. start passing K/V as above;
  2. compute the block's gradients; dQ accumulates locally (float32);
  3. wait for the dK/dV partial sums of this K/V block from r - 1 (they travel
     one step behind the K/V), add ours, send them on to r + 1;
  after the last step the partial sums of our own K/V block arrive, complete.

Only two K/V buffers and two dK/dV buffers exist per call; each is reused
every step (ping-pong), which oneCCL needs to reuse its IPC handles and which
keeps peak memory flat. The communicator's ``wait()`` orders the device work
(the collective runs on its own stream/thread), and no buffer is written while
a transfer may still read it.

Exception safety: an error in a rank's compute (a kernel, the merge) does not end
its loop. The rank stops computing but keeps making every exchange of the call,
so no transfer is left in flight on any rank and the group serves the next call;
after the last exchange ``comm.finish`` tells every rank who failed, and all raise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .. import agreement
from ..agreement import ComputeFailure
from ..comm import in_flight
from ..comm.ring import RingComm
from ..kernels.base import KernelBackend
from ..kernels.mask import Band
from ..merge import accumulator_dtype, merge_into, new_accumulators
from .batching import TaskBatch, VarlenBatch, add_rows, gather_rows, put_rows, step_calls
from .documents import DocumentCall, document_calls
from .layouts import Layout


@dataclass(frozen=True)
class RingPlan:
    """Everything one ring attention call needs besides its tensors."""

    layout: Layout
    band: Band  # position-space mask (causal, window)
    scale: float
    softcap: float
    backend: KernelBackend
    comm: Any  # RingComm or any object with rank, world_size, exchange(send, recv, kind) and finish(...)
    alibi_slopes: Optional[torch.Tensor] = None
    # One document-masked call per step for a packed batch (ring/documents.py), where the backend serves it.
    documents: bool = False
    # A packed batch's small blocks as variable-length calls (ring/batching.VarlenBatch), where the backend
    # serves them.
    varlen: bool = False
    # The backward's call on one block runs as this many calls on groups of K/V heads (and their query heads).
    # Heads are independent, so results are the same; a fused backward's own workspace (a float32 dQ, dK/dV
    # per query head for GQA) scales with the heads of a call, so its peak falls, for more launches.
    backward_head_chunks: int = 1

    @property
    def groups(self) -> tuple:
        """The process groups the plan's exchanges use (none for a stand-in communicator such as the loopback)."""
        return (self.comm.group,) if isinstance(self.comm, RingComm) else ()

    def calls(self, src: int, seqlen_local: int):
        """The kernel calls on the K/V of rank ``src``: one document-masked call, or the planner's with the
        small ones of equal shape batched."""
        if self.documents:
            return document_calls(self.layout, self.comm.rank, src, self.comm.world_size, seqlen_local, self.band)
        return step_calls(self.layout, self.comm.rank, src, self.comm.world_size, seqlen_local, self.band,
                          keep_positions=self.alibi_slopes is not None, varlen=self.varlen)

    def kernel_kwargs(self, task) -> dict:
        return kernel_kwargs(task, self.scale, self.softcap, self.alibi_slopes)

    def forward(self, q, k, v):
        return ring_forward(q, k, v, self)

    def backward(self, dout, q, k, v, out, lse):
        return ring_backward(dout, q, k, v, out, lse, self)


def kernel_kwargs(task, scale: float, softcap: float, alibi_slopes: Optional[torch.Tensor]) -> dict:
    """The keyword arguments of one kernel call; ALiBi's only when it is on (backends without it never see them)."""
    if isinstance(task, (DocumentCall, VarlenBatch)):  # the mask is the call's own; neither takes ALiBi
        return dict(scale=scale, softcap=softcap)
    kwargs = dict(scale=scale, softcap=softcap, **task.kernel_mask_args())
    if alibi_slopes is not None:
        delta, stride = task.positions
        if alibi_slopes.dim() == 2 and isinstance(task, TaskBatch):  # [B, H]: a batch is B x n blocks, b-major
            alibi_slopes = alibi_slopes.repeat_interleave(len(task), dim=0)
        kwargs.update(alibi_slopes=alibi_slopes, alibi_delta=delta, alibi_stride=stride)
    return kwargs


def fold_call(backend, call, kwargs, q, k, v, out_acc, lse_acc) -> None:
    """Fold one planned call (a block, or a :class:`TaskBatch` of blocks) into the accumulators, with the
    kernel arguments ``kwargs`` (:func:`kernel_kwargs`)."""
    if isinstance(call, DocumentCall):
        merge_into(out_acc, lse_acc, *backend.forward_documents(q, k, v, call, **kwargs))
        return
    if isinstance(call, VarlenBatch):  # [1, S, H, D]: packed batches have one row
        q_rows, k_rows = call.indices(q.device)
        out, lse = backend.forward_varlen(q[0].index_select(0, q_rows), k[0].index_select(0, k_rows),
                                          v[0].index_select(0, k_rows), call, **kwargs)
        out_part, lse_part = out_acc[0].index_select(0, q_rows), lse_acc[0].index_select(1, q_rows)
        merge_into(out_part[None], lse_part[None], out[None], lse[None])
        out_acc[0].index_copy_(0, q_rows, out_part)
        lse_acc[0].index_copy_(1, q_rows, lse_part)
        return
    if not isinstance(call, TaskBatch):
        backend.forward_accumulate(q[:, call.q], k[:, call.k], v[:, call.k], out_acc[:, call.q],
                                   lse_acc[:, :, call.q], **kwargs)
        return
    q_rows, k_rows = call.indices(q.device)
    out_part = gather_rows(out_acc, q_rows, call.q_len)
    lse_part = gather_rows(lse_acc, q_rows, call.q_len, dim=2)
    backend.forward_accumulate(
        gather_rows(q, q_rows, call.q_len), gather_rows(k, k_rows, call.k_len), gather_rows(v, k_rows, call.k_len),
        out_part, lse_part, **kwargs)
    put_rows(out_acc, q_rows, out_part)
    put_rows(lse_acc, q_rows, lse_part, dim=2)


def call_gradients(backend, call, kwargs, dout, q, k, v, out, lse, dq_acc, head_chunks: int = 1):
    """One planned call's backward: its dQ is added to ``dq_acc``; its ``(dK, dV)`` are returned, for
    :func:`add_key_gradients` once the partial sums they join have arrived. ``head_chunks`` > 1 (one block,
    no ALiBi): that many calls on groups of K/V heads, whose (dK, dV) come back as tuples of the groups'."""
    if isinstance(call, DocumentCall):
        dq, dk, dv = backend.backward_documents(dout, q, k, v, out, lse, call, **kwargs)
        dq_acc += dq
        return dk, dv
    if isinstance(call, VarlenBatch):
        q_rows, k_rows = call.indices(q.device)
        dq, dk, dv = backend.backward_varlen(
            *(t[0].index_select(0, q_rows) for t in (dout, q)), *(t[0].index_select(0, k_rows) for t in (k, v)),
            out[0].index_select(0, q_rows), lse[0].index_select(1, q_rows), call, **kwargs)
        dq_acc[0].index_add_(0, q_rows, dq.to(dq_acc.dtype))
        return dk, dv
    if not isinstance(call, TaskBatch) and (head_chunks == 1 or "alibi_slopes" in kwargs):
        dq, dk, dv = backend.backward(dout[:, call.q], q[:, call.q], k[:, call.k], v[:, call.k],
                                      out[:, call.q], lse[:, :, call.q], **kwargs)
        dq_acc[:, call.q] += dq
        return dk, dv
    if not isinstance(call, TaskBatch):
        dks, dvs = [], []
        for q_heads, k_heads in _head_groups(q.shape[2], k.shape[2], head_chunks):
            dq, dk, dv = backend.backward(dout[:, call.q, q_heads], q[:, call.q, q_heads], k[:, call.k, k_heads],
                                          v[:, call.k, k_heads], out[:, call.q, q_heads], lse[:, q_heads, call.q],
                                          **kwargs)
            dq_acc[:, call.q, q_heads] += dq
            dks.append(dk)
            dvs.append(dv)
        return tuple(dks), tuple(dvs)
    q_rows, k_rows = call.indices(q.device)
    dq, dk, dv = backend.backward(
        *(gather_rows(t, q_rows, call.q_len) for t in (dout, q)),
        *(gather_rows(t, k_rows, call.k_len) for t in (k, v)),
        gather_rows(out, q_rows, call.q_len), gather_rows(lse, q_rows, call.q_len, dim=2), **kwargs)
    add_rows(dq_acc, q_rows, dq)
    return dk, dv


def _head_groups(heads: int, heads_k: int, chunks: int):
    """``chunks`` (query heads, K/V heads) slices: consecutive K/V heads and the query heads that use them."""
    per_chunk, groups = heads_k // chunks, heads // heads_k
    return [(slice(c * per_chunk * groups, (c + 1) * per_chunk * groups), slice(c * per_chunk, (c + 1) * per_chunk))
            for c in range(chunks)]


def add_key_gradients(call, dk, dv, dk_acc, dv_acc) -> None:
    if isinstance(call, DocumentCall):  # every key row
        dk_acc += dk
        dv_acc += dv
        return
    if isinstance(call, VarlenBatch):
        _, k_rows = call.indices(dk_acc.device)
        dk_acc[0].index_add_(0, k_rows, dk.to(dk_acc.dtype))
        dv_acc[0].index_add_(0, k_rows, dv.to(dv_acc.dtype))
        return
    if isinstance(dk, tuple):  # groups of K/V heads (call_gradients' head_chunks)
        for (_, k_heads), dk_part, dv_part in zip(_head_groups(1, dk_acc.shape[2], len(dk)), dk, dv):
            dk_acc[:, call.k, k_heads] += dk_part
            dv_acc[:, call.k, k_heads] += dv_part
        return
    if not isinstance(call, TaskBatch):
        dk_acc[:, call.k] += dk
        dv_acc[:, call.k] += dv
        return
    _, k_rows = call.indices(dk_acc.device)
    add_rows(dk_acc, k_rows, dk)
    add_rows(dv_acc, k_rows, dv)


def ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan,
                 failure: Optional[ComputeFailure] = None):
    """Returns ``out`` (q's dtype, [B, S, H, D]) and ``lse`` (float32 [B, H, S]).

    ``failure``: this rank's compute already failed before the call (an exchange around the ring, such as
    Ulysses' all-to-alls, keeps its peers' calls matched): it makes every exchange and computes nothing."""
    comm, seqlen = plan.comm, q.shape[1]
    out_acc, lse_acc = new_accumulators(q)
    kv = [torch.stack((k, v)), None]  # [2, B, S, Hk, D]; the second buffer is allocated at the first exchange
    for step in range(comm.world_size):
        pending = None
        if step + 1 < comm.world_size:
            if kv[1] is None:
                kv[1] = torch.empty_like(kv[0])
            pending = comm.exchange(kv[0], kv[1])
        if failure is None:
            try:
                for call in plan.calls((comm.rank - step) % comm.world_size, seqlen):
                    fold_call(plan.backend, call, plan.kernel_kwargs(call), q, kv[0][0], kv[0][1], out_acc, lse_acc)
            except BaseException as error:  # keep passing K/V: the other ranks' exchanges must stay matched
                failure = ComputeFailure(error, f"forward step {step}")
        if pending is not None:
            pending.wait()
            kv.reverse()
    comm.finish(failure, "ring forward", q.device)
    return out_acc.to(q.dtype), lse_acc


def ring_backward(dout, q, k, v, out, lse, plan: RingPlan, failure: Optional[ComputeFailure] = None):
    """Gradients of the ring attention for this rank's q, k, v (their dtypes); ``failure`` as in
    :func:`ring_forward`."""
    comm, seqlen = plan.comm, q.shape[1]
    acc_dtype = accumulator_dtype(q.dtype)
    dq_acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    kv = [torch.stack((k, v)), None]
    dkv = [torch.zeros((2, *k.shape), dtype=acc_dtype, device=k.device), None]
    pending_dkv = None
    for step in range(comm.world_size):
        pending_kv = None
        if step + 1 < comm.world_size:
            if kv[1] is None:
                kv[1] = torch.empty_like(kv[0])
                dkv[1] = torch.empty_like(dkv[0])
            pending_kv = comm.exchange(kv[0], kv[1])
        block_grads = []
        if failure is None:
            try:
                for call in plan.calls((comm.rank - step) % comm.world_size, seqlen):
                    block_grads.append((call, *call_gradients(plan.backend, call, plan.kernel_kwargs(call), dout, q,
                                                              kv[0][0], kv[0][1], out, lse, dq_acc,
                                                              plan.backward_head_chunks)))
            except BaseException as error:  # keep passing K/V and dK/dV (ours left out) to the end of the ring
                failure, block_grads = ComputeFailure(error, f"backward step {step}"), []
        if pending_dkv is not None:
            pending_dkv.wait()  # dkv[0] now holds the partial sums for the K/V block we just used
        for call, dk, dv in block_grads:
            add_key_gradients(call, dk, dv, dkv[0][0], dkv[0][1])
        if comm.world_size > 1:
            pending_dkv = comm.exchange(dkv[0], dkv[1], kind="grad")
            dkv.reverse()
        if pending_kv is not None:
            pending_kv.wait()
            kv.reverse()
    if pending_dkv is not None:
        pending_dkv.wait()
    comm.finish(failure, "ring backward", q.device)
    return dq_acc.to(q.dtype), dkv[0][0].to(k.dtype), dkv[0][1].to(v.dtype)


def lse_gradient_inputs(dout, q, k, v, out, lse, dlse):
    """The backward's inputs with the heads doubled so that one backward also carries the LSE's gradient; returns
    them and ``fold(dq, dk, dv)``, which gives the gradients of the original heads.

    ``d lse_i / d s_ij = p_ij``, so ``dlse`` adds ``p_ij * dlse_i`` to the score gradient: in the flash
    backward's ``ds = p * (dp - D)``, ``D = rowsum(dout * out)`` becomes ``D - dlse``. The kernels form D from
    dout and out themselves, so the LSE's part runs as a copy of the heads with v = 0 (so dp = 0 and nothing
    reaches dV), dout = e_0 and out = -dlse * e_0 (so D = -dlse): the copy's dq and dk are exactly the LSE's.
    GQA holds: query head H + h uses K/V head Hk + h // groups, the copy of its own. Costs a second backward's
    compute and transfers, only when the LSE has a gradient. Per-head arguments (ALiBi slopes) must be doubled
    alike (:func:`doubled_heads`)."""
    heads, heads_k = q.shape[2], k.shape[2]
    unit = torch.zeros_like(dout)
    unit[..., 0] = 1
    row_term = torch.zeros_like(out)
    row_term[..., 0] = -dlse.transpose(1, 2)
    inputs = (torch.cat([dout, unit], 2), torch.cat([q, q], 2), torch.cat([k, k], 2),
              torch.cat([v, torch.zeros_like(v)], 2), torch.cat([out, row_term], 2), torch.cat([lse, lse], 1))

    def fold(dq, dk, dv):
        return dq[:, :, :heads] + dq[:, :, heads:], dk[:, :, :heads_k] + dk[:, :, heads_k:], dv[:, :, :heads_k]
    return inputs, fold


def doubled_heads(plan):
    """``plan`` (a dataclass with ``alibi_slopes``) for the doubled heads of :func:`lse_gradient_inputs`."""
    slopes = plan.alibi_slopes
    return plan if slopes is None else dataclasses.replace(plan, alibi_slopes=torch.cat([slopes, slopes], -1))


def agree_on_lse_gradient(groups, dlse, device) -> None:
    """Whether the LSE has a gradient decides the backward's transfers (doubled heads), so every rank of each
    group must say the same (an agreement round: with RING_FLASH_ATTN_AGREE=once only when it changes)."""
    for group in groups:
        agreement.agree(group, (("LSE gradient", dlse is not None),), device, kind="attention backward")


class ContextParallelAttention(torch.autograd.Function):
    """Autograd for any exchange plan (ring or all-gather): the plan's own backward, not per-block autograd.

    A plan has ``forward(q, k, v) -> (out, lse)``, ``backward(dout, q, k, v, out, lse) -> (dq, dk, dv)``,
    ``groups`` (the process groups its exchanges use: one call at a time on them, comm/in_flight.py) and
    ``alibi_slopes``. The LSE is differentiable (:func:`lse_gradient_inputs`).
    """

    @staticmethod
    def forward(ctx, q, k, v, plan):
        out, lse = plan.forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        ctx.set_materialize_grads(False)  # dlse None: the LSE has no gradient, the backward is the plain one
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if torch.is_grad_enabled():  # create_graph=True: every rank gets here, before any exchange
            raise NotImplementedError("create_graph: double backward through ring attention is not supported "
                                      "(its backward is not differentiable); call backward with create_graph=False")
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        with in_flight.one_call_at_a_time(ctx.plan.groups, "an attention backward"):
            agree_on_lse_gradient(ctx.plan.groups, dlse, q.device)
            if dlse is None:
                dq, dk, dv = ctx.plan.backward(dout, q, k, v, out, lse)
            else:
                inputs, fold = lse_gradient_inputs(dout, q, k, v, out, lse, dlse)
                dq, dk, dv = fold(*doubled_heads(ctx.plan).backward(*inputs))
        return dq, dk, dv, None
