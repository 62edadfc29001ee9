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


def _merge_full(a: BlockTask, b: BlockTask) -> Optional[BlockTask]:
    if a.band is not None or b.band is not None:
        return None
    if (a.q_start, a.q_stop) == (b.q_start, b.q_stop) and a.k_stop == b.k_start:
        return BlockTask(a.q_start, a.q_stop, a.k_start, b.k_stop, None)
    if (a.k_start, a.k_stop) == (b.k_start, b.k_stop) and a.q_stop == b.q_start:
        return BlockTask(a.q_start, b.q_stop, a.k_start, a.k_stop, None)
    return None


def _coalesce(tasks: list) -> list:
    merged = True
    while merged:
        merged = False
        tasks.sort(key=lambda t: (t.q_start, t.k_start))
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                if i != j and (joined := _merge_full(tasks[i], tasks[j])) is not None:
                    tasks = [t for n, t in enumerate(tasks) if n not in (i, j)] + [joined]
                    merged = True
                    break
            if merged:
                break
    return tasks


@lru_cache(maxsize=4096)
def plan_step(layout: Layout, rank: int, src: int, world_size: int, seqlen_local: int,
              band: Band) -> Tuple[BlockTask, ...]:
    """The kernel calls rank ``rank`` makes on the K/V of rank ``src`` under the position-space ``band``."""
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
                                   None if full else index_band))
    return tuple(_coalesce(tasks))


def needs_band_mask(layout: Layout, rank: int, world_size: int, seqlen_local: int, band: Band) -> bool:
    """Whether any kernel call of this rank needs a mask beyond "none" or top-left causal on a square block
    (which decides whether PyTorch's fused GPU ops can serve the call)."""
    return any(task.band is not None and not task.band.is_top_left_causal(task.q_stop - task.q_start,
                                                                          task.k_stop - task.k_start)
               for src in range(world_size)
               for task in plan_step(layout, rank, src, world_size, seqlen_local, band))
