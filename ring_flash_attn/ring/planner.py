"""Which kernel calls one ring step needs.

At ring step ``t`` rank ``r`` holds the K/V of rank ``src = r - t (mod P)``.
For every (query run of ``r``, key run of ``src``) pair of the same segment the
position-space mask becomes an index-space band (the arithmetic of
:func:`~ring_flash_attn.kernels.mask.strided_band`); empty pairs are dropped
(no launch), fully visible pairs that touch are merged into one call, and partly
visible pairs carry the kernel's mask arguments.

Planning takes time linear in the number of sequences plus the number of calls
(merging adds a log factor where one sequence has many runs), because each
training batch brings new ``cu_seqlens`` and is planned afresh: key runs are
grouped by segment, so a query run meets only the key runs of its own sequence;
fully visible blocks are merged without rescanning; a packed batch is planned once
per distinct sequence length (all sequences of one length have the same calls,
shifted); and whether any rank needs a band mask is read off the run geometries
of the distinct lengths at once, without planning all P^2 (rank, source) pairs.
"""

from __future__ import annotations

import heapq
import itertools
from functools import lru_cache
from typing import NamedTuple, Optional, Tuple

import torch

from ..kernels.mask import Band, ceil_div
from .layouts import Layout, PackedLayout


class BlockTask(NamedTuple):
    """One kernel call: local query rows [q_start, q_stop) against local key rows [k_start, k_stop).

    A named tuple, not a dataclass: a packed batch plans tens of thousands of calls, and a tuple is the
    cheapest immutable record to make.
    """

    q_start: int
    q_stop: int
    k_start: int
    k_stop: int
    band: Optional[Band]  # None: every key visible
    # (delta, stride): position(q row i) - position(k row j) = delta + stride * (i - j), for position-dependent
    # biases (ALiBi); None where coalescing joined blocks whose positions are not one arithmetic progression.
    positions: Optional[Tuple[int, int]] = None

    @property
    def q(self) -> slice:
        return slice(self.q_start, self.q_stop)

    @property
    def k(self) -> slice:
        return slice(self.k_start, self.k_stop)

    def kernel_mask_args(self) -> dict:
        if self.band is None:
            return dict(causal=False, window=(-1, -1), q_offset=0, k_offset=0)
        return self.band.to_kernel_args()

    def shifted(self, q_by: int, k_by: int) -> "BlockTask":
        """The same call on rows moved by ``q_by`` / ``k_by`` (bands and positions are relative to the block)."""
        return tuple.__new__(BlockTask, (self.q_start + q_by, self.q_stop + q_by, self.k_start + k_by,
                                         self.k_stop + k_by, self.band, self.positions))


def _order(task: BlockTask):
    return task.q_start, task.k_start


def _joined(a: BlockTask, b: BlockTask, along_k: bool, keep_positions: bool) -> Optional[BlockTask]:
    """``a`` and ``b`` (fully visible, ``b`` right after ``a`` along k or q) as one call, or None.

    The joined call keeps ``a``'s positions if ``b``'s continue the same progression, else has none, which
    ``keep_positions`` (ALiBi) refuses.
    """
    if along_k:
        adjacent = a.q_start == b.q_start and a.q_stop == b.q_stop and a.k_stop == b.k_start
    else:
        adjacent = a.k_start == b.k_start and a.k_stop == b.k_stop and a.q_stop == b.q_start
    if not adjacent:
        return None
    positions = None
    if a.positions is not None and b.positions is not None and a.positions[1] == b.positions[1]:
        (delta_a, stride), delta_b = a.positions, b.positions[0]
        step = stride * ((a.k_stop - a.k_start) if along_k else -(a.q_stop - a.q_start))
        if delta_b == delta_a - step:
            positions = a.positions
    if keep_positions and positions is None:
        return None
    if along_k:
        return BlockTask(a.q_start, a.q_stop, a.k_start, b.k_stop, None, positions)
    return BlockTask(a.q_start, b.q_stop, a.k_start, a.k_stop, None, positions)


# A block by the edge it starts or ends at, along k (same query rows) or along q (same key rows).
def _starts_k(t):
    return t.q_start, t.q_stop, t.k_start


def _ends_k(t):
    return t.q_start, t.q_stop, t.k_stop


def _starts_q(t):
    return t.k_start, t.k_stop, t.q_start


def _ends_q(t):
    return t.k_start, t.k_stop, t.q_stop


_EDGES = (_starts_k, _ends_k, _starts_q, _ends_q)


def _coalesce(tasks: list, keep_positions: bool) -> list:
    """Merge touching fully visible blocks until none can be; the calls in (q_start, k_start) order.

    The merges are those of the rule "join the first block in (q_start, k_start) order that can be joined with
    the block right after it along k, else along q; repeat", found without rescanning: a block that could not
    be joined stays so until a merge puts a new block right after it, so only the (at most two) blocks right
    before a new block are looked at again. O(n log n) in the number of blocks.
    """
    full = [t for t in tasks if t.band is None]
    if len(full) == 2:  # the common case (a zigzag step off the diagonal): the rule in one step
        a, b = sorted(full, key=_order)
        joined = _joined(a, b, True, keep_positions) or _joined(a, b, False, keep_positions)
        full = [joined] if joined else [a, b]
    elif len(full) > 2:
        starts_k, ends_k, starts_q, ends_q = tables = ({}, {}, {}, {})
        candidates, tiebreak = [], itertools.count()

        def queue(task):
            heapq.heappush(candidates, (task.q_start, task.k_start, next(tiebreak), task))

        for task in full:
            for table, edge in zip(tables, _EDGES):
                table[edge(task)] = task
            queue(task)
        while candidates:
            a = heapq.heappop(candidates)[-1]
            if starts_k.get(_starts_k(a)) is not a:
                continue  # merged away since it was queued
            for along_k, b in ((True, starts_k.get(_ends_k(a))), (False, starts_q.get(_ends_q(a)))):
                joined = None if b is None else _joined(a, b, along_k, keep_positions)
                if joined is None:
                    continue
                for table, edge in zip(tables, _EDGES):
                    del table[edge(a)], table[edge(b)]
                    table[edge(joined)] = joined
                queue(joined)
                for before in (ends_k.get(_starts_k(joined)), ends_q.get(_starts_q(joined))):
                    if before is not None:
                        queue(before)
                break
        full = list(starts_k.values())
    return sorted([t for t in tasks if t.band is not None] + full, key=_order)


def _block_task(q_run, k_run, band: Band) -> Optional[BlockTask]:
    if q_run.stride != k_run.stride:
        raise ValueError("layouts with different strides on different ranks are not supported")
    delta = q_run.global_start - k_run.global_start
    lo, hi, somewhere, everywhere = _index_bands(q_run.length, k_run.length, delta, q_run.stride, band)
    if not somewhere:
        return None
    return BlockTask(q_run.local_start, q_run.local_start + q_run.length,
                     k_run.local_start, k_run.local_start + k_run.length,
                     None if everywhere else Band(lo, hi, 0), (delta, q_run.stride))


def _plan_runs(layout: Layout, rank: int, src: int, world_size: int, seqlen_local: int, band: Band,
               keep_positions: bool) -> Tuple[BlockTask, ...]:
    k_runs_by_segment = {}
    for k_run in layout.runs(src, world_size, seqlen_local):
        k_runs_by_segment.setdefault(k_run.segment, []).append(k_run)
    tasks = [task for q_run in layout.runs(rank, world_size, seqlen_local)
             for k_run in k_runs_by_segment.get(q_run.segment, ())
             if (task := _block_task(q_run, k_run, band)) is not None]
    return tuple(_coalesce(tasks, keep_positions))


def _plan_packed(layout: PackedLayout, rank: int, src: int, world_size: int, band: Band,
                 keep_positions: bool) -> Tuple[BlockTask, ...]:
    """Each sequence's calls are its base layout's for its length, moved to where the sequence starts.

    That is exactly what pairing the packed runs gives: a sequence's positions are its base positions plus
    P * (its local start) on both the query and the key side, so index bands and position deltas are the base
    ones; and blocks of two sequences never share query rows or key rows, so no merge crosses a sequence.
    The calls come out in (q_start, k_start) order because sequences are in local order.
    """
    plans, tasks, local_start = {}, [], 0
    make = tuple.__new__  # BlockTask(...) without the named tuple's argument handling: a third of the time
    for length in layout.seqlens_local:
        if length:
            base_plan = plans.get(length)
            if base_plan is None:
                base_plan = plans[length] = _base_plan(layout.base, rank, src, world_size, length, band,
                                                       keep_positions)
            for q_start, q_stop, k_start, k_stop, task_band, positions in base_plan:
                tasks.append(make(BlockTask, (q_start + local_start, q_stop + local_start, k_start + local_start,
                                              k_stop + local_start, task_band, positions)))
        local_start += length
    return tuple(tasks)


def plan_step(layout: Layout, rank: int, src: int, world_size: int, seqlen_local: int,
              band: Band, keep_positions: bool = False) -> Tuple[BlockTask, ...]:
    """The kernel calls rank ``rank`` makes on the K/V of rank ``src`` under the position-space ``band``.

    ``keep_positions`` joins blocks only where their token positions stay one
    arithmetic progression (needed by position-dependent biases such as ALiBi);
    otherwise any touching fully visible blocks become one call.
    """
    if isinstance(layout, PackedLayout):
        return _packed_plan(layout, rank, src, world_size, band, keep_positions)
    return _base_plan(layout, rank, src, world_size, seqlen_local, band, keep_positions)


# A packed plan holds a call per sequence (up to a megabyte for thousands of sequences) and is reused by the
# layers and the backward of one batch: room for one batch's P sources at P <= 256. A base plan is a few
# calls, reused by every sequence of its length in later batches too.
_packed_plan = lru_cache(maxsize=256)(_plan_packed)
_base_plan = lru_cache(maxsize=1 << 16)(_plan_runs)
# Every cache of plans, for clear_plan_caches (ring/batching.py adds its batched calls).
PLAN_CACHES = [_packed_plan, _base_plan]


def clear_plan_caches() -> None:
    """Forget every plan (benchmarks time planning from cold with it)."""
    for cached in PLAN_CACHES:
        cached.cache_clear()


@lru_cache(maxsize=256)
def layout_needs_band_mask(layout: Layout, world_size: int, seqlen_local: int, band: Band) -> bool:
    """:func:`needs_band_mask` over the calls of EVERY rank: the same answer on all ranks, so that all pick the
    same kernel backend (or raise the same error) and none is left waiting in the ring.

    Merging joins only fully visible blocks, which never need a mask, so the answer is whether any (query run,
    key run) pair of any two ranks is a partly visible block needing one; that depends only on the pair's
    geometry (:meth:`~ring_flash_attn.ring.layouts.Layout.pair_geometries`), evaluated for all distinct
    sequence lengths of a packed batch at once.
    """
    if isinstance(layout, PackedLayout):
        base, lengths = layout.base, sorted(set(layout.seqlens_local) - {0})
    else:
        base, lengths = layout, [seqlen_local]
    if not lengths:
        return False
    geometry = base.pair_geometries(world_size, torch.tensor(lengths, dtype=torch.int64))
    return bool(_pairs_need_band(*geometry, band).any())


PLAN_CACHES.append(layout_needs_band_mask)


def _index_bands(q_len, k_len, delta, stride, band: Band):
    """``(lo, hi, somewhere, everywhere)`` of the block of a (query run, key run) pair: the index-space bounds
    on ``i - j`` (None where ``band`` has none) and whether some / every key is visible. On ints, or on int64
    tensors elementwise (many blocks at once).

    The arithmetic of :func:`~ring_flash_attn.kernels.mask.strided_band`, ``Band.is_empty`` and
    ``Band.is_full``, in one function for both (tests/test_planner.py holds it to the previous planner,
    which used those).
    """
    shift = delta + band.offset
    lo = None if band.lo is None else ceil_div(band.lo - shift, stride)
    hi = None if band.hi is None else (band.hi - shift) // stride
    d_min, d_max = 1 - k_len, q_len - 1
    somewhere, everywhere = (q_len > 0) & (k_len > 0), True
    if lo is not None:
        somewhere, everywhere = somewhere & (d_max >= lo), everywhere & (d_min >= lo)
    if hi is not None:
        somewhere, everywhere = somewhere & (d_min <= hi), everywhere & (d_max <= hi)
    if lo is not None and hi is not None:
        somewhere = somewhere & (lo <= hi)
    return lo, hi, somewhere, everywhere


def _pairs_need_band(q_len, k_len, delta, stride, band: Band) -> torch.Tensor:
    """Elementwise over (query run, key run) pairs given as tensors: would the pair's call need a band mask
    (:func:`needs_band_mask`)?"""
    lo, hi, somewhere, everywhere = _index_bands(q_len, k_len, delta, stride, band)
    needs = somewhere & ~torch.as_tensor(everywhere)
    if lo is not None and hi is None:
        # causal on a square block, shifted by 0 or 1: PyTorch's fused causal ops serve it
        needs &= ~((q_len == k_len) & ((lo == 0) | (lo == 1)))
    return needs


def needs_band_mask(tasks) -> bool:
    """Whether any of these kernel calls needs a mask beyond "none" or (shifted) causal on a square block
    (which decides whether PyTorch's fused GPU ops can serve the call)."""
    return any(task.band is not None
               and task.band.causal_shift(task.q_stop - task.q_start, task.k_stop - task.k_start) not in (0, 1)
               for task in tasks)
