"""Which kernel calls one ring step needs.

At ring step ``t`` rank ``r`` holds the K/V of rank ``src = r - t (mod P)``.
For every (query run of ``r``, key run of ``src``) pair the position-space mask
becomes an index-space band (:func:`~ring_flash_attn.kernels.mask.strided_band`);
empty pairs are dropped (no launch), fully visible pairs that touch are merged
into one call, and partly visible pairs carry the kernel's mask arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Tuple

from ..kernels.mask import Band, strided_band
from .layouts import Layout


@dataclass(frozen=True)
class BlockTask:
    """One kernel call: local query rows [q_start, q_stop) against local key rows [k_start, k_stop)."""

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


def _joined_positions(a: BlockTask, b: BlockTask, k_side: bool):
    """Positions of a joined with b (b after a along k or q), or None if they do not continue one progression."""
    if a.positions is None or b.positions is None or a.positions[1] != b.positions[1]:
        return None
    (delta_a, stride), (delta_b, _) = a.positions, b.positions
    step = stride * ((a.k_stop - a.k_start) if k_side else -(a.q_stop - a.q_start))
    return a.positions if delta_b == delta_a - step else None


def _merge_full(a: BlockTask, b: BlockTask, keep_positions: bool) -> Optional[BlockTask]:
    if a.band is not None or b.band is not None:
        return None
    for k_side in (True, False):
        adjacent = ((a.q_start, a.q_stop) == (b.q_start, b.q_stop) and a.k_stop == b.k_start) if k_side else \
            ((a.k_start, a.k_stop) == (b.k_start, b.k_stop) and a.q_stop == b.q_start)
        if not adjacent:
            continue
        positions = _joined_positions(a, b, k_side)
        if keep_positions and positions is None:
            return None
        if k_side:
            return BlockTask(a.q_start, a.q_stop, a.k_start, b.k_stop, None, positions)
        return BlockTask(a.q_start, b.q_stop, a.k_start, a.k_stop, None, positions)
    return None


def _coalesce(tasks: list, keep_positions: bool) -> list:
    merged = True
    while merged:
        merged = False
        tasks.sort(key=lambda t: (t.q_start, t.k_start))
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                if i != j and (joined := _merge_full(tasks[i], tasks[j], keep_positions)) is not None:
                    tasks = [t for n, t in enumerate(tasks) if n not in (i, j)] + [joined]
                    merged = True
                    break
            if merged:
                break
    return tasks


def _plan_step(layout: Layout, rank: int, src: int, world_size: int, seqlen_local: int,
               band: Band, keep_positions: bool = False) -> Tuple[BlockTask, ...]:
    """The kernel calls rank ``rank`` makes on the K/V of rank ``src`` under the position-space ``band``.

    ``keep_positions`` joins blocks only where their token positions stay one
    arithmetic progression (needed by position-dependent biases such as ALiBi);
    otherwise any touching fully visible blocks become one call.
    """
    tasks = []
    for q_run in layout.runs(rank, world_size, seqlen_local):
        for k_run in layout.runs(src, world_size, seqlen_local):
            if q_run.segment != k_run.segment:
                continue
            if q_run.stride != k_run.stride:
                raise ValueError("layouts with different strides on different ranks are not supported")
            index_band = strided_band(band, q_run.global_start, k_run.global_start, q_run.stride)
            if index_band.is_empty(q_run.length, k_run.length):
                continue
            full = index_band.is_full(q_run.length, k_run.length)
            tasks.append(BlockTask(q_run.local_start, q_run.local_start + q_run.length,
                                   k_run.local_start, k_run.local_start + k_run.length,
                                   None if full else index_band,
                                   (q_run.global_start - k_run.global_start, q_run.stride)))
    return tuple(_coalesce(tasks, keep_positions))


plan_step = lru_cache(maxsize=4096)(_plan_step)


@lru_cache(maxsize=256)
def layout_needs_band_mask(layout: Layout, world_size: int, seqlen_local: int, band: Band,
                           keep_positions: bool = False) -> bool:
    """:func:`needs_band_mask` over the calls of EVERY rank: the same answer on all ranks, so that all pick the
    same kernel backend (or raise the same error) and none is left waiting in the ring."""
    return any(needs_band_mask(_plan_step(layout, rank, src, world_size, seqlen_local, band, keep_positions))
               for rank in range(world_size) for src in range(world_size))


def needs_band_mask(tasks) -> bool:
    """Whether any of these kernel calls needs a mask beyond "none" or (shifted) causal on a square block
    (which decides whether PyTorch's fused GPU ops can serve the call)."""
    return any(task.band is not None
               and task.band.causal_shift(task.q_stop - task.q_start, task.k_stop - task.k_start) not in (0, 1)
               for task in tasks)
