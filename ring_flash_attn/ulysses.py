"""Ulysses (all-to-all) context parallelism, and USP: Ulysses inside the ring.

DeepSpeed-Ulysses re-partitions by heads: every rank holds a slice of the sequence with all heads; an
all-to-all gives each of the U ranks the whole sequence for ``heads / U`` of the heads; attention runs there;
a second all-to-all brings the output back to the sequence split. USP (yunchang; TransformerEngine's
``a2a+p2p``) puts that inside a ring: on a ``ulysses x ring`` mesh of ``U * R`` ranks the all-to-all gathers
the sequence slices of the U ranks of one ring rank, and the ring engine (:mod:`ring_flash_attn.ring.engine`)
passes the gathered K/V around the R ring ranks. Nothing here is another attention loop: it is an exchange
(all-to-all) around :func:`~ring_flash_attn.functional.ring_attention`, with its kernels, masks and backward.

Layout. The sequence is laid out over the ``U * R`` context-parallel ranks by the chosen variant exactly as
ring attention lays it out over ``U * R`` ranks: context-parallel rank ``c = ring_rank * U + ulysses_rank``
holds ``shard_sequence(x, variant, c, U * R)``. So ``shard_sequence`` / ``gather_sequence``,
``RingAttention.shard`` / ``.gather``, ``hf.shard_batch`` and Megatron's own zigzag split serve Ulysses and
USP unchanged, and a variant keeps its balance: under ``zigzag`` ring rank r gathers chunks ``rU .. rU+U-1``
of the ``2UR`` chunks and their mirror images, which is the zigzag layout over R ranks with U times the chunk.
After the all-to-all a ring rank holds its U slices one after the other; when sorting those tokens by
position leaves fewer contiguous stretches (zigzag: 2U become 2; Ulysses alone: one), they are reordered
locally (one index) so that the ring planner makes fewer, larger kernel calls.

GQA: K/V heads are scattered like query heads. When the Ulysses degree does not divide the K/V heads, each
K/V head is repeated only as often as needed (``U / gcd(heads_k, U)`` times) for every rank to receive whole
K/V heads for its query heads; autograd sums the repeats' gradients back.

The all-to-alls go through ``torch.distributed.all_to_all_single`` (xccl, nccl, gloo), asynchronously and one
chunk of heads at a time: while the ring engine runs chunk c (its own forward / backward, on the gathered
heads), the all-to-all of chunk c+1 and the way back of chunk c-1 are in flight. One collective carries q, k
and v of a chunk together. The backward is the same pipeline with the inverse all-to-alls (dout in, dq / dk /
dv back); the whole call is one autograd node, because the pipeline must decide the order of the backward's
collectives itself. Every check runs before the first collective and depends only on values every rank knows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from . import agreement
from .comm import in_flight
from .comm.ring import RingComm
from .functional import ring_attention
from .kernels import Features, select_backend
from .kernels.mask import Band, check_window
from .merge import accumulator_dtype
from .ring.layouts import DerivedLayout, Layout, PackedLayout, Run, get_layout
from .ring.engine import RingPlan, doubled_heads, lse_gradient_inputs, ring_backward, ring_forward
from .ring.planner import layout_needs_band_mask
from .tracing import outside_graphs
from .validation import (backward_head_chunks, check_alibi_slopes, check_cu_seqlens, check_packed_alibi_slopes,
                         check_flag, check_packed_qkv, check_qkv, check_softcap, check_softmax_scale,
                         group_rank_and_size)


# ----------------------------------------------------------------------------------------------------------
# What a ring rank holds after the all-to-all.


@dataclass(frozen=True)
class UlyssesLayout(DerivedLayout):
    """The ring's view of a ``ulysses x ring`` mesh: ring rank r holds the tokens of context-parallel ranks
    ``rU .. rU+U-1`` under ``base`` (laid out over ``U * R`` ranks), in the order :func:`_arrangement` chose.

    Its ``seqlen_local`` is the gathered length (U slices) and its ``world_size`` the ring size R.
    """

    base: Layout
    ulysses_size: int

    def check(self, seqlen_local, world_size, causal):
        self.base.check(seqlen_local // self.ulysses_size, world_size * self.ulysses_size, causal)

    def runs(self, rank, world_size, seqlen_local):
        return _arrangement(self.base, self.ulysses_size, world_size, seqlen_local // self.ulysses_size)[0][rank]


def _join(runs) -> Tuple[Run, ...]:
    """Merge runs that continue each other locally and in position."""
    joined = []
    for run in runs:
        last = joined[-1] if joined else None
        if last is not None and last.segment == run.segment and last.stride == run.stride \
                and last.local_start + last.length == run.local_start \
                and last.global_start + last.stride * last.length == run.global_start:
            joined[-1] = last._replace(length=last.length + run.length)
        else:
            joined.append(run)
    return tuple(joined)


def _gathered_runs(base: Layout, ulysses_size: int, ring_rank: int, ring_size: int, seqlen_local: int):
    """The runs of ring rank ``ring_rank``'s U slices, one after the other (the all-to-all's own order)."""
    world_size = ulysses_size * ring_size
    return [run._replace(local_start=run.local_start + u * seqlen_local)
            for u in range(ulysses_size)
            for run in base.runs(ring_rank * ulysses_size + u, world_size, seqlen_local)]


def _positions_and_segments(runs):
    positions = torch.cat([run.global_start + run.stride * torch.arange(run.length) for run in runs])
    segments = torch.cat([torch.full((run.length,), run.segment) for run in runs])
    return positions, segments


def _sorted_breaks(runs):
    """Sorting the tokens by position: the order, the sorted positions/segments and where contiguous stretches
    of one segment begin (after index 0)."""
    positions, segments = _positions_and_segments(runs)
    order = torch.argsort(positions, stable=True)
    positions, segments = positions[order], segments[order]
    breaks = torch.nonzero((positions[1:] - positions[:-1] != 1) | (segments[1:] != segments[:-1])).flatten() + 1
    return order, positions, segments, breaks


@lru_cache(maxsize=64)
def _arrangement(base: Layout, ulysses_size: int, ring_size: int, seqlen_local: int):
    """(runs of every ring rank, whether the gathered tokens are sorted by position).

    The same on every rank (it depends only on the layout and the mesh shape): the tokens are sorted when that
    gives fewer runs over all ring ranks, so every ring rank reorders alike and runs keep one stride."""
    as_gathered = [_join(_gathered_runs(base, ulysses_size, r, ring_size, seqlen_local)) for r in range(ring_size)]
    sorted_breaks = [_sorted_breaks(_gathered_runs(base, ulysses_size, r, ring_size, seqlen_local))
                     for r in range(ring_size)]
    if sum(len(b[3]) + 1 for b in sorted_breaks) >= sum(len(runs) for runs in as_gathered):
        return tuple(as_gathered), False
    by_rank = []
    for _, positions, segments, breaks in sorted_breaks:
        starts = [0] + breaks.tolist()
        stops = starts[1:] + [positions.numel()]
        by_rank.append(tuple(Run(a, b - a, int(positions[a]), 1, int(segments[a])) for a, b in zip(starts, stops)))
    return tuple(by_rank), True


@lru_cache(maxsize=64)
def _reorder(base: Layout, ulysses_size: int, ring_size: int, seqlen_local: int, ring_rank: int, device):
    """(order, inverse) on ``device``: gathered[:, order] is the sorted sequence; None if not sorted."""
    if not _arrangement(base, ulysses_size, ring_size, seqlen_local)[1]:
        return None
    order = _sorted_breaks(_gathered_runs(base, ulysses_size, ring_rank, ring_size, seqlen_local))[0]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return order.to(device), inverse.to(device)


# ----------------------------------------------------------------------------------------------------------
# The all-to-alls, one head chunk at a time, and the attention between them.


@dataclass(frozen=True)
class _AllToAll:
    group: Optional[dist.ProcessGroup]
    size: int
    reorder: Optional[tuple]  # (order, inverse) of the gathered sequence, or None


class _Pending:
    """An all-to-all in flight; ``wait()`` returns the received buffer. The send buffer is held until then:
    the backend may still read it on its own stream or thread. On CPU (gloo, where waiting blocks anyway) the
    wait is bounded (:func:`~ring_flash_attn.agreement.wait_bounded`)."""

    def __init__(self, send: torch.Tensor, group):
        self._send, self._recv = send, torch.empty_like(send)
        self._work = dist.all_to_all_single(self._recv, send, group=group, async_op=True)

    @property
    def in_flight_on_device(self) -> bool:
        """Not waited for yet, on a device (whose stream, not the host, waits for it)."""
        return self._work is not None and self._send.device.type != "cpu"

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            if self._send.device.type == "cpu":
                agreement.wait_bounded([self._work], "Ulysses all-to-all")
            else:
                self._work.wait()
            self._work, self._send = None, None
        return self._recv


def _finish_all_on_error(started) -> None:
    """An exchange failed mid-pipeline: no all-to-all this rank started on a device is left in flight with its
    buffers (the device waits; the host does not). CPU ones are left to gloo, whose work holds its buffers:
    waiting for them would wait out the bound once more per all-to-all."""
    for pending in started:
        if pending.in_flight_on_device:
            try:
                pending.wait()
            except Exception:  # the error being raised is the one to report
                pass


class _FailLate:
    """The first error of this rank's compute during one Ulysses pass. After it the rank computes nothing but
    still makes every all-to-all (with zeros of the shape it would have sent) and every ring exchange, so the
    other ranks' collectives stay matched and the group serves the next call; at the end of the pass every
    rank of the mesh hears of it (:func:`~ring_flash_attn.agreement.finish_all`) and raises."""

    def __init__(self, where: str):
        self.where, self.failure = where, None

    def record(self, error: BaseException, what: str) -> None:
        if self.failure is None:
            self.failure = agreement.ComputeFailure(error, f"{self.where}, {what}")

    def run(self, what: str, compute, placeholder):
        """``compute()``, or ``placeholder()`` once anything failed."""
        if self.failure is None:
            try:
                return compute()
            except BaseException as error:  # keep making the collectives: the other ranks wait in them
                self.record(error, what)
        return placeholder()


def _zeros(like: torch.Tensor, *shape, dtype=None) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype or like.dtype, device=like.device)


def _start_to_heads(tensors, a2a: _AllToAll, chunk: int, chunks: int, fails: _FailLate) -> _Pending:
    """Start the all-to-all of head chunk ``chunk`` of each ``[B, S_l, H_i, D]``: rank j receives the
    ``chunk``-th of the ``chunks`` parts of head block j (one collective for all tensors)."""
    first = tensors[0]
    heads = sum(t.shape[2] // (a2a.size * chunks) for t in tensors)
    send = fails.run(f"sending head chunk {chunk}", lambda: torch.cat(
        [t.unflatten(2, (a2a.size, chunks, -1))[:, :, :, chunk].movedim(2, 0) for t in tensors], dim=3),
        lambda: _zeros(first, a2a.size, first.shape[0], first.shape[1], heads, first.shape[3]))
    return _Pending(send, a2a.group)  # [U, B, S_l, sum of heads, D]


def _finish_to_heads(pending: _Pending, heads, a2a: _AllToAll, chunk: int, fails: _FailLate):
    """The gathered ``[B, U*S_l, heads_i, D]`` tensors: the U ranks' slices in rank order, then reordered."""
    received = pending.wait()

    def gathered():
        joined = received.movedim(0, 1).flatten(1, 2)
        if a2a.reorder is not None:
            joined = joined.index_select(1, a2a.reorder[0])
        return joined.split(heads, dim=2)

    size, batch, seqlen, _, head_dim = received.shape
    return fails.run(f"gathering head chunk {chunk}", gathered,
                     lambda: [_zeros(received, batch, size * seqlen, h, head_dim) for h in heads])


def _start_to_sequence(tensors, a2a: _AllToAll, chunk: int, fails: _FailLate) -> _Pending:
    """Start the inverse all-to-all of gathered ``[B, U*S_l, h_i, D]`` tensors (back to the sequence split)."""
    def send():
        parts = tensors if a2a.reorder is None else [t.index_select(1, a2a.reorder[1]) for t in tensors]
        return torch.cat([t.unflatten(1, (a2a.size, -1)).movedim(1, 0) for t in parts], dim=3)

    first = tensors[0]
    return _Pending(fails.run(f"returning head chunk {chunk}", send, lambda: _zeros(
        first, a2a.size, first.shape[0], first.shape[1] // a2a.size, sum(t.shape[2] for t in tensors),
        first.shape[3])), a2a.group)


def _finish_to_sequence(pending: _Pending, outs, chunk: int, chunks: int, fails: _FailLate) -> None:
    """Write head chunk ``chunk`` of each ``[B, S_l, H_i, D]`` in ``outs`` from the received buffer."""
    received = pending.wait()  # [U, B, S_l, sum of heads, D]

    def write():
        size = received.shape[0]
        for out, part in zip(outs, received.split([out.shape[2] // (size * chunks) for out in outs], dim=3)):
            out.unflatten(2, (size, chunks, -1))[:, :, :, chunk] = part.movedim(0, 2)

    fails.run(f"writing head chunk {chunk}", write, lambda: None)


def _start_lse_to_sequence(lse: torch.Tensor, a2a: _AllToAll, chunk: int, fails: _FailLate) -> _Pending:
    """The same for a chunk's LSE, ``[B, h, U*S_l]``."""
    def send():
        ordered = lse if a2a.reorder is None else lse.index_select(2, a2a.reorder[1])
        return ordered.unflatten(2, (a2a.size, -1)).movedim(2, 0).contiguous()  # [U, B, h, S_l]

    batch, heads, seqlen = lse.shape
    return _Pending(fails.run(f"returning the LSE of head chunk {chunk}", send,
                              lambda: _zeros(lse, a2a.size, batch, heads, seqlen // a2a.size)), a2a.group)


def _finish_lse_to_sequence(pending: _Pending, lse: torch.Tensor, chunk: int, chunks: int, fails: _FailLate) -> None:
    received = pending.wait()

    def write():
        lse.unflatten(1, (received.shape[0], chunks, -1))[:, :, chunk] = received.movedim(0, 1)

    fails.run(f"writing the LSE of head chunk {chunk}", write, lambda: None)


@dataclass(frozen=True)
class _UlyssesPlan:
    """One call: the all-to-all, per head chunk the ring engine's plan for the gathered heads, and the groups
    that hear of a failure at the end of a pass (the Ulysses group, then the ring group: every rank)."""

    a2a: _AllToAll
    rings: Tuple[RingPlan, ...]
    groups: Tuple[dist.ProcessGroup, ...]

    @property
    def chunks(self) -> int:
        return len(self.rings)

    @property
    def check_rounds(self) -> tuple:
        """The groups an agreement runs on in turn (as :func:`_check_rounds`): the row, the column, the row."""
        return self.groups + self.groups[:1] if len(self.groups) == 2 else self.groups


def _ring_pass(engine, fails: _FailLate, chunk: int, args, placeholder):
    """One chunk's ring forward or backward. It runs even after a failure (``fails.failure``: it then makes its
    exchanges and computes nothing), so that the ring's other ranks are matched; its compute error comes back
    on its rank only (:class:`_RingInMesh`) and joins ``fails``. An exchange's error raises."""
    try:
        return engine(*args, failure=fails.failure)
    except _RingComputeFailed as failed:  # the ring made every exchange; the pass goes on
        fails.record(failed.failure.error, f"head chunk {chunk}, {failed.failure.where}")
        return placeholder()


def _ulysses_forward(q, k, v, plan: _UlyssesPlan):
    """(out, lse, what the backward needs per chunk). While the ring engine runs one head chunk, the next
    chunk's all-to-all and the previous chunk's way back are in flight."""
    a2a, chunks = plan.a2a, plan.chunks
    heads = [t.shape[2] // (a2a.size * chunks) for t in (q, k, v)]
    fails = _FailLate("Ulysses forward")
    saved, returning, started = [], [], []
    try:
        incoming = _start_to_heads((q, k, v), a2a, 0, chunks, fails)
        started.append(incoming)
        for chunk, ring in enumerate(plan.rings):
            q_heads, k_heads, v_heads = _finish_to_heads(incoming, heads, a2a, chunk, fails)
            if chunk + 1 < chunks:
                incoming = _start_to_heads((q, k, v), a2a, chunk + 1, chunks, fails)
                started.append(incoming)
            out_heads, lse_heads = _ring_pass(ring_forward, fails, chunk, (q_heads, k_heads, v_heads, ring), lambda: (
                torch.zeros_like(q_heads), _zeros(q_heads, q_heads.shape[0], heads[0], q_heads.shape[1],
                                                  dtype=accumulator_dtype(q_heads.dtype))))
            saved.append((q_heads, k_heads, v_heads, out_heads, lse_heads))
            returning.append((_start_to_sequence((out_heads,), a2a, chunk, fails),
                              _start_lse_to_sequence(lse_heads, a2a, chunk, fails)))
            started.extend(returning[-1])
        out = torch.empty_like(q)
        lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=saved[0][4].dtype, device=q.device)
        for chunk, (out_pending, lse_pending) in enumerate(returning):
            _finish_to_sequence(out_pending, (out,), chunk, chunks, fails)
            _finish_lse_to_sequence(lse_pending, lse, chunk, chunks, fails)
    except BaseException:
        _finish_all_on_error(started)
        raise
    agreement.finish_all(plan.groups, fails.failure, q.device, "Ulysses forward")
    return out, lse, saved


def _ulysses_backward(dout, saved, plan: _UlyssesPlan, k_shape, dlse=None):
    """dq, dk, dv (k/v with their repeated heads), pipelined over the head chunks like the forward. With ``dlse``
    (the LSE's gradient, [B, H, S_l]) it travels with dout as a head-dim column and each chunk's ring backward
    carries it (:func:`~ring_flash_attn.ring.engine.lse_gradient_inputs`)."""
    a2a, chunks = plan.a2a, plan.chunks
    dq, dk = torch.empty_like(dout), torch.empty(k_shape, dtype=dout.dtype, device=dout.device)
    dv = torch.empty_like(dk)
    fails = _FailLate("Ulysses backward")
    returning, started = [], []
    incoming_tensors = (dout,)
    if dlse is not None:
        dlse_column = torch.zeros_like(dout)
        dlse_column[..., 0] = dlse.transpose(1, 2)
        incoming_tensors = (dout, dlse_column)
    heads = [dout.shape[2] // (a2a.size * chunks)] * len(incoming_tensors)
    try:
        incoming = _start_to_heads(incoming_tensors, a2a, 0, chunks, fails)
        started.append(incoming)
        for chunk, ring in enumerate(plan.rings):
            dout_heads, *dlse_heads = _finish_to_heads(incoming, heads, a2a, chunk, fails)
            if chunk + 1 < chunks:
                incoming = _start_to_heads(incoming_tensors, a2a, chunk + 1, chunks, fails)
                started.append(incoming)
            inputs, fold = (dout_heads.contiguous(), *saved[chunk]), lambda *grads: grads
            if dlse is not None:
                inputs, fold = lse_gradient_inputs(*inputs[:6], dlse_heads[0][..., 0].transpose(1, 2))
                ring = doubled_heads(ring)
            q_heads, k_heads, v_heads = inputs[1:4]
            grads = fold(*_ring_pass(ring_backward, fails, chunk, (*inputs, ring),
                                     lambda: tuple(torch.zeros_like(t) for t in (q_heads, k_heads, v_heads))))
            returning.append(_start_to_sequence(grads, a2a, chunk, fails))
            started.append(returning[-1])
        for chunk, pending in enumerate(returning):
            _finish_to_sequence(pending, (dq, dk, dv), chunk, chunks, fails)
    except BaseException:
        _finish_all_on_error(started)
        raise
    agreement.finish_all(plan.groups, fails.failure, dout.device, "Ulysses backward")
    return dq, dk, dv


class _UlyssesAttention(torch.autograd.Function):
    """The whole call as one autograd node: forward and backward each pipeline all-to-alls around the ring
    engine's own forward / backward (the backward of an all-to-all is the inverse all-to-all)."""

    @staticmethod
    def forward(ctx, q, k, v, plan):
        out, lse, saved = _ulysses_forward(q, k, v, plan)
        ctx.save_for_backward(*(t for chunk in saved for t in chunk))
        ctx.plan, ctx.k_shape, ctx.q_like = plan, k.shape, (q.shape, q.dtype, q.device)
        ctx.set_materialize_grads(False)  # dlse None: the LSE has no gradient, the backward is the plain one
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if torch.is_grad_enabled():  # create_graph=True: every rank gets here, before any all-to-all
            raise NotImplementedError("create_graph: double backward through Ulysses attention is not supported "
                                      "(its backward is not differentiable); call backward with create_graph=False")
        saved = ctx.saved_tensors
        per_chunk = [saved[5 * n:5 * n + 5] for n in range(ctx.plan.chunks)]
        shape, dtype, device = ctx.q_like
        dout = torch.zeros(shape, dtype=dtype, device=device) if dout is None else dout.contiguous()
        with in_flight.one_call_at_a_time(ctx.plan.groups, "a Ulysses backward"):
            agreement.agree_all(ctx.plan.check_rounds, (("LSE gradient", dlse is not None),), device,
                                kind="ulysses backward")
            dq, dk, dv = _ulysses_backward(dout, per_chunk, ctx.plan, ctx.k_shape, dlse)
        return dq, dk, dv, None


# ----------------------------------------------------------------------------------------------------------
# Groups.


class _RingComputeFailed(Exception):
    """A ring call's compute failed on this rank; its exchanges were all made (the ring engine fails late)."""

    def __init__(self, failure):
        super().__init__(str(failure.error))
        self.failure = failure


class _RingInMesh(RingComm):
    """The ring of a Ulysses mesh. A compute failure comes back to the Ulysses pass on its rank alone, which
    goes on making its collectives and tells the whole mesh at its end: one check per pass, not one per ring
    call, and the ring's other ranks learn of it then."""

    def finish(self, failure, what: str, device: torch.device) -> None:
        if failure is not None:
            raise _RingComputeFailed(failure)


class _OneRankRing:
    """The ring of a mesh whose ring dimension is one rank: the engine makes no exchange on it. A compute
    failure raises there, or (``in_mesh``: under Ulysses' all-to-alls) comes back to the pass as
    :class:`_RingInMesh` describes."""

    rank, world_size = 0, 1

    def __init__(self, in_mesh: bool):
        self.in_mesh = in_mesh

    def finish(self, failure, what: str, device: torch.device) -> None:
        if failure is not None:
            raise _RingComputeFailed(failure) if self.in_mesh else failure.error

    def exchange(self, send, recv, kind="kv"):
        raise RuntimeError("a ring of one rank has no peer to exchange with")


@dataclass(frozen=True)
class UspGroups:
    """A ``ulysses x ring`` mesh over the context-parallel ``group``: its rank ``c`` is ulysses rank
    ``c % ulysses_size`` and ring rank ``c // ulysses_size``. A dimension of one rank has no group (None)."""

    group: Optional[dist.ProcessGroup]
    ulysses_size: int
    ring_size: int
    ulysses_group: Optional[dist.ProcessGroup]
    ring_group: Optional[dist.ProcessGroup]

    def attention_groups(self) -> dict:
        """The ``ulysses_group`` / ``ring_group`` arguments of :func:`usp_attention`."""
        return dict(ulysses_group=self.ulysses_group, ring_group=self.ring_group)


_GROUPS: dict = {}


def usp_process_groups(ulysses_size: int, group: Optional[dist.ProcessGroup] = None,
                       timeout: Optional[timedelta] = None) -> UspGroups:
    """Split the context-parallel ``group`` (None: the default group) into a ``ulysses x ring`` mesh, the
    Ulysses dimension inner (consecutive group ranks: put it inside a node). Every member of ``group`` must
    call it (it creates process groups); the groups are made once per (group, ulysses_size) and reused, so a
    first call with ``timeout`` (the new groups' collective timeout; default: the backend's) sets it for
    every later user (the module, the integrations).

    Raises ValueError on every rank if ``ulysses_size`` does not divide the group size.
    """
    if isinstance(ulysses_size, bool) or not isinstance(ulysses_size, int) or ulysses_size < 1:
        raise ValueError(f"ulysses_size: expected a positive int, got {ulysses_size!r}")
    rank, world_size = group_rank_and_size(group)
    if world_size % ulysses_size:
        raise ValueError(f"ulysses_size: must divide the context-parallel group size {world_size} "
                         f"(ulysses x ring mesh), got {ulysses_size}")
    key = (group if group is not None else dist.group.WORLD, ulysses_size)
    if key in _GROUPS:
        return _GROUPS[key]
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    ring_size, u, r = world_size // ulysses_size, rank % ulysses_size, rank // ulysses_size

    def sub(members):
        if len(members) == 1:
            return None
        if len(members) == world_size:  # the whole group (never None here: None means a dimension of one rank)
            return group if group is not None else dist.group.WORLD
        # Only the members take part (use_local_synchronization): ranks outside this context-parallel group
        # need not know its mesh; each member creates just its own two groups.
        return dist.new_group(members, timeout=timeout, use_local_synchronization=True)

    groups = UspGroups(group, ulysses_size, ring_size,
                       ulysses_group=sub([ranks[r * ulysses_size + i] for i in range(ulysses_size)]),
                       ring_group=sub([ranks[j * ulysses_size + u] for j in range(ring_size)]))
    for name, sub_group, want in (("ulysses", groups.ulysses_group, u), ("ring", groups.ring_group, r)):
        if sub_group is not None and dist.get_rank(sub_group) != want:
            raise ValueError(f"group: its ranks must be in ascending order of global rank for the {name} "
                             f"dimension to follow them; got ranks {ranks}")
    _GROUPS[key] = groups
    return groups


def _mesh(ulysses_group, ring_group):
    """(u, U, r, R) of this rank; ValueError unless the two groups are one row and one column of a mesh."""
    u, ulysses_size = group_rank_and_size(ulysses_group) if ulysses_group is not None else (0, 1)
    r, ring_size = group_rank_and_size(ring_group) if ring_group is not None else (0, 1)
    if ulysses_group is not None and ring_group is not None:
        shared = set(dist.get_process_group_ranks(ulysses_group)) & set(dist.get_process_group_ranks(ring_group))
        if len(shared) != 1:
            raise ValueError(f"ulysses_group, ring_group: expected one row and one column of a ulysses x ring "
                             f"mesh, sharing only this rank; they share ranks {sorted(shared)}")
    return u, ulysses_size, r, ring_size


# ----------------------------------------------------------------------------------------------------------
# Attention.


def _check_rounds(ulysses_group, ring_group):
    """The groups a mesh's agreement runs on, in turn: the row, the column, the row again (one round per
    dimension of more than one rank; the row again only when there is a column to hear from)."""
    if ring_group is None:
        return () if ulysses_group is None else (ulysses_group,)
    return (ring_group,) if ulysses_group is None else (ulysses_group, ring_group, ulysses_group)


@outside_graphs
@agreement.shares_errors(groups=lambda argument: _check_rounds(argument("ulysses_group"), argument("ring_group")))
def usp_attention(q, k, v, *, ulysses_group: Optional[dist.ProcessGroup], ring_group: Optional[dist.ProcessGroup],
                  variant: str = "ring", causal: bool = False, softmax_scale: Optional[float] = None,
                  window_size=(-1, -1), softcap: float = 0.0, backend: Optional[str] = None,
                  cu_seqlens: Optional[torch.Tensor] = None, alibi_slopes: Optional[torch.Tensor] = None,
                  head_chunks: Optional[int] = None):
    """Attention on a ``ulysses x ring`` mesh (USP); returns ``(out, lse)`` like
    :func:`~ring_flash_attn.functional.ring_attention`.

    ``q`` ``[batch, seqlen_local, heads, head_dim]``, ``k``/``v`` with ``heads_k`` heads (GQA/MQA), this
    context-parallel rank's slice in ``variant``'s layout over all ``U * R`` ranks (rank
    ``ring_rank * U + ulysses_rank``; see the module docstring). ``ulysses_group`` (U ranks) and
    ``ring_group`` (R ranks) are this rank's row and column of the mesh; None stands for a dimension of one
    rank (so ``ring_group=None`` is Ulysses alone, ``ulysses_group=None`` the ring alone). ``heads`` must be
    divisible by U. ``lse``: float32 ``[batch, heads, seqlen_local]``, differentiable.

    With ``cu_seqlens`` (this rank's cumulative lengths of packed sequences, int32; each sequence laid out
    over the ``U * R`` ranks by ``variant`` on its own), q/k/v are ``[total_tokens_local, heads, head_dim]``
    and ``lse`` is ``[heads, total_tokens_local]``. Masks (``causal``, ``window_size``, ``softcap``,
    ``alibi_slopes``) and ``backend`` are as in ring attention; every check runs before any communication.

    ``head_chunks``: the all-to-alls and the attention run in this many chunks of heads, so that one chunk's
    all-to-all overlaps another chunk's attention; it must divide the K/V heads each Ulysses rank receives
    (default: the largest of 4, 2, 1 that does). Results do not depend on it.
    """
    u, ulysses_size, ring_rank, ring_size = _mesh(ulysses_group, ring_group)
    if ulysses_size == 1:  # the ring alone: nothing to re-partition
        return ring_attention(q, k, v, variant=variant, causal=causal, softmax_scale=softmax_scale,
                              window_size=window_size, softcap=softcap, group=ring_group, backend=backend,
                              cu_seqlens=cu_seqlens, alibi_slopes=alibi_slopes,
                              comm=_OneRankRing(in_mesh=False) if ring_group is None else None)
    layout = get_layout(variant)
    packed = cu_seqlens is not None
    if packed:
        check_packed_qkv(q, k, v)
        layout = PackedLayout(layout, check_cu_seqlens(cu_seqlens, q.shape[0]))
        alibi_slopes = check_packed_alibi_slopes(alibi_slopes, q)
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    else:
        check_qkv(q, k, v)
        alibi_slopes = check_alibi_slopes(alibi_slopes, q)
    window, softcap = check_window(window_size), check_softcap(softcap)
    scale, causal = check_softmax_scale(softmax_scale, q.shape[-1]), check_flag(causal, "causal")
    heads, heads_k, seqlen_local = q.shape[2], k.shape[2], q.shape[1]
    if heads % ulysses_size:
        raise ValueError(f"q: the number of query heads must be divisible by the Ulysses degree {ulysses_size} "
                         f"(each rank attends with heads / {ulysses_size} of them), got {heads}")
    layout.check(seqlen_local, ulysses_size * ring_size, causal)
    gathered_layout = UlyssesLayout(layout, ulysses_size)
    band = Band.from_kernel_args(causal, window)
    kernel = select_backend(Features(q.device.type, q.dtype, q.shape[-1], band=layout_needs_band_mask(
        gathered_layout, ring_size, ulysses_size * seqlen_local, band),
        softcap=softcap > 0, alibi=alibi_slopes is not None), backend)
    repeats = ulysses_size // math.gcd(heads_k, ulysses_size)
    heads_k_per_rank = heads_k * repeats // ulysses_size
    if head_chunks is None:
        head_chunks = next(n for n in (4, 2, 1) if heads_k_per_rank % n == 0)
    elif isinstance(head_chunks, bool) or not isinstance(head_chunks, int) or head_chunks < 1 \
            or heads_k_per_rank % head_chunks:
        raise ValueError(f"head_chunks: expected a positive divisor of the K/V heads each Ulysses rank receives "
                         f"({heads_k_per_rank}), got {head_chunks!r}")

    if repeats > 1:  # every rank needs whole K/V heads for its query heads; autograd sums the repeats back
        k, v = k.repeat_interleave(repeats, dim=2), v.repeat_interleave(repeats, dim=2)
    a2a = _AllToAll(ulysses_group, ulysses_size, _reorder(layout, ulysses_size, ring_size, seqlen_local, ring_rank,
                                                          q.device))
    comm = _RingInMesh(ring_group) if ring_group is not None else _OneRankRing(in_mesh=True)
    chunk_heads = heads // ulysses_size // head_chunks
    ring_backward_head_chunks = backward_head_chunks(heads_k_per_rank // head_chunks)
    rings = []
    for chunk in range(head_chunks):
        first = u * (heads // ulysses_size) + chunk * chunk_heads  # this rank's query heads in this chunk
        slopes = None if alibi_slopes is None else alibi_slopes[..., first:first + chunk_heads]
        rings.append(RingPlan(layout=gathered_layout, band=band, scale=scale, softcap=softcap, backend=kernel,
                              comm=comm, alibi_slopes=slopes, backward_head_chunks=ring_backward_head_chunks))
    # Every rank of the mesh agrees before the first all-to-all (rows, columns, rows: see agree_all).
    agreement.agree_all(_check_rounds(ulysses_group, ring_group), agreement.describe(
        q, k, v, exchange="ulysses", mesh=(ulysses_size, ring_size), causal=causal, window_size=window,
        softmax_scale=scale, softcap=softcap, head_chunks=head_chunks,
        alibi_slopes=None if alibi_slopes is None else tuple(alibi_slopes.shape), **agreement.layout_items(layout)),
        q.device, kind="ulysses")
    plan = _UlyssesPlan(a2a, tuple(rings), groups=tuple(g for g in (ulysses_group, ring_group) if g is not None))
    out, lse = _UlyssesAttention.apply(q, k, v, plan)
    return (out.squeeze(0), lse.squeeze(0)) if packed else (out, lse)


def ulysses_attention(q, k, v, *, variant: str = "ring", causal: bool = False, softmax_scale: Optional[float] = None,
                      window_size=(-1, -1), softcap: float = 0.0, group: Optional[dist.ProcessGroup] = None,
                      backend: Optional[str] = None, cu_seqlens: Optional[torch.Tensor] = None,
                      alibi_slopes: Optional[torch.Tensor] = None, head_chunks: Optional[int] = None):
    """DeepSpeed-Ulysses attention over ``group`` (None: the default group); returns ``(out, lse)``.

    :func:`usp_attention` with the whole group as the Ulysses dimension and no ring: each rank attends over
    the whole sequence with ``heads / P`` of the heads. Inputs, layouts and outputs as in ring attention
    (``variant`` is the layout of the slices over the group's ranks; ``ring`` needs no reordering).
    """
    return usp_attention(q, k, v, ulysses_group=group if group is not None else dist.group.WORLD, ring_group=None,
                         variant=variant, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                         softcap=softcap, backend=backend, cu_seqlens=cu_seqlens, alibi_slopes=alibi_slopes,
                         head_chunks=head_chunks)
