"""One kernel call per ring step for a packed batch: a document mask instead of a call per sequence.

A packed batch holds many sequences ("documents"); the planner gives one block per (sequence, ring step),
and even batched by shape (ring/batching.py) a batch of many distinct lengths makes many calls. A backend
that takes an arbitrary mask as a block-sparse kernel (FlexAttention) can serve a whole ring step in one
call instead: every local query row against every key row of the source rank, a key visible iff it is of
the same sequence and inside the band by true token positions. The kernel skips the tiles the mask leaves
empty, so the work stays that of the sequences' own blocks (plus the tiles cut by sequence edges).

The call's description (:class:`DocumentCall`) is per (layout, rank, source, band) and cached like the
plans: every layer of a batch and its backward reuse it, and a backend caches its device-side mask on it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

import torch

from ..kernels.mask import Band
from .layouts import PackedLayout
from .planner import PLAN_CACHES, plan_step


class DocumentCall:
    """Queries of one rank against the keys of one source rank of a packed batch: key j is visible to query
    i iff ``segments[i] == segments[j]`` and ``lo <= q_positions[i] - k_positions[j] + offset <= hi``
    (:class:`~ring_flash_attn.kernels.mask.Band`). ``segments``: the sequence of each local row (the same on
    every rank: every rank holds a slice of every sequence)."""

    __slots__ = ("segments", "q_positions", "k_positions", "band", "_device_cache")

    def __init__(self, segments: torch.Tensor, q_positions: torch.Tensor, k_positions: torch.Tensor, band: Band):
        self.segments, self.q_positions, self.k_positions, self.band = segments, q_positions, k_positions, band
        self._device_cache = {}

    def cached(self, key, make):
        """``make()`` once per ``key`` (e.g. a backend's block mask on a device), kept with this call."""
        found = self._device_cache.get(key)
        if found is None:
            found = self._device_cache[key] = make()
        return found


@lru_cache(maxsize=64)  # as ring/batching.step_calls: a call holds device memory (a backend's block mask)
def document_call(layout: PackedLayout, rank: int, src: int, world_size: int, seqlen_local: int,
                  band: Band) -> Optional[DocumentCall]:
    """The one call of ring step (rank, src), or None where the band leaves every block empty."""
    if not plan_step(layout, rank, src, world_size, seqlen_local, band):
        return None
    lengths = torch.tensor(layout.seqlens_local, dtype=torch.int64)
    segments = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    return DocumentCall(segments, layout.positions(rank, world_size, seqlen_local),
                        layout.positions(src, world_size, seqlen_local), band)


PLAN_CACHES.append(document_call)


def document_calls(layout, rank: int, src: int, world_size: int, seqlen_local: int,
                   band: Band) -> Tuple[DocumentCall, ...]:
    call = document_call(layout, rank, src, world_size, seqlen_local, band)
    return () if call is None else (call,)
