"""Which keys a query may see inside one (query block, key block) pair.

Every kernel backend takes the same mask arguments: ``causal``, ``window`` and
the block offsets ``q_offset`` / ``k_offset``. Query row ``i`` may see key
column ``j`` iff, with ``d = (q_offset + i) - (k_offset + j)``:

* ``causal``             -> ``d >= 0``
* ``window = (left, right)``, ``left >= 0``  -> ``d <= left``
* ``window = (left, right)``, ``right >= 0`` -> ``d >= -right``

``-1`` means "unbounded", as in flash-attn. This is a band ``lo <= d <= hi``;
:class:`Band` is its normalised form, which the ring planner and the backends
share so that a mask is described once.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Band:
    """Visible keys satisfy ``lo <= (q_offset + i) - (k_offset + j) <= hi``.

    ``None`` bounds are unbounded. ``offset`` is ``q_offset - k_offset``.
    """

    lo: Optional[int] = None
    hi: Optional[int] = None
    offset: int = 0

    @staticmethod
    def from_kernel_args(causal: bool, window: tuple[int, int], q_offset: int = 0, k_offset: int = 0) -> "Band":
        left, right = window
        # As in flash-attn, causal overrides the right window.
        lo = 0 if causal else (-right if right >= 0 else None)
        hi = left if left >= 0 else None
        return Band(lo, hi, q_offset - k_offset)

    def to_kernel_args(self) -> dict:
        """The (causal, window, q_offset, k_offset) arguments that express this band."""
        if self.lo is not None:
            # Shift so the lower bound sits at d = 0, which "causal" expresses.
            left = -1 if self.hi is None else self.hi - self.lo
            return dict(causal=True, window=(left, -1), q_offset=self.offset - self.lo, k_offset=0)
        if self.hi is not None:
            return dict(causal=False, window=(0, -1), q_offset=self.offset - self.hi, k_offset=0)
        return dict(causal=False, window=(-1, -1), q_offset=0, k_offset=0)

    @property
    def unbounded(self) -> bool:
        return self.lo is None and self.hi is None

    def d_range(self, seqlen_q: int, seqlen_k: int) -> tuple[int, int]:
        """Smallest and largest ``d`` over the block."""
        return self.offset - (seqlen_k - 1), self.offset + seqlen_q - 1

    def is_empty(self, seqlen_q: int, seqlen_k: int) -> bool:
        if seqlen_q == 0 or seqlen_k == 0 or (self.lo is not None and self.hi is not None and self.lo > self.hi):
            return True
        d_min, d_max = self.d_range(seqlen_q, seqlen_k)
        return (self.lo is not None and d_max < self.lo) or (self.hi is not None and d_min > self.hi)

    def is_full(self, seqlen_q: int, seqlen_k: int) -> bool:
        d_min, d_max = self.d_range(seqlen_q, seqlen_k)
        return (self.lo is None or d_min >= self.lo) and (self.hi is None or d_max <= self.hi)

    def is_top_left_causal(self, seqlen_q: int, seqlen_k: int) -> bool:
        """True when the band is exactly the ``is_causal=True`` mask of PyTorch's fused ops."""
        return self.lo == 0 and self.hi is None and self.offset == 0 and seqlen_q == seqlen_k

    def causal_shift(self, seqlen_q: int, seqlen_k: int) -> Optional[int]:
        """``s`` if this band is exactly "row i sees keys j <= i - s" on a square block, else None.

        ``s = 0`` is PyTorch's ``is_causal=True``; ``s = 1`` (the stripe layout's steps from later
        ranks) is the same mask on ``q[1:]`` against ``k[:-1]``, so fused causal ops serve both.
        """
        if self.lo is None or self.hi is not None or seqlen_q != seqlen_k:
            return None
        return self.lo - self.offset

    def dense(self, seqlen_q: int, seqlen_k: int, device=None) -> torch.Tensor:
        """Boolean [seqlen_q, seqlen_k] mask, True where the key is visible."""
        i = torch.arange(seqlen_q, device=device).unsqueeze(1)
        j = torch.arange(seqlen_k, device=device).unsqueeze(0)
        d = i - j + self.offset
        visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
        if self.lo is not None:
            visible &= d >= self.lo
        if self.hi is not None:
            visible &= d <= self.hi
        return visible

    def empty_rows(self, seqlen_q: int, seqlen_k: int, device=None) -> torch.Tensor:
        """Boolean [seqlen_q]: rows that see no key in this block."""
        i = torch.arange(seqlen_q, device=device)
        # Row i sees keys j with i + offset - hi <= j <= i + offset - lo.
        first = i + self.offset - self.hi if self.hi is not None else torch.zeros_like(i)
        last = i + self.offset - self.lo if self.lo is not None else torch.full_like(i, seqlen_k - 1)
        return (first.clamp(min=0) > last.clamp(max=seqlen_k - 1))


def check_window(window_size) -> tuple[int, int]:
    """Validate a flash-attn style ``window_size``, a pair (left, right) of ints >= -1 (-1 = unbounded), and
    return it as a tuple of Python ints. Floats are refused rather than truncated, and a string rather than
    read character by character ("12" is not (1, 2))."""
    expected = "window_size: expected a pair (left, right) of ints >= -1 (-1 = unbounded)"
    if isinstance(window_size, (str, bytes)) or not hasattr(window_size, "__iter__"):
        raise ValueError(f"{expected}, got {window_size!r} ({type(window_size).__name__})")
    pair = tuple(window_size)
    if len(pair) != 2:
        raise ValueError(f"{expected}, got {window_size!r}")
    for side in pair:
        try:
            if isinstance(side, bool):
                raise TypeError
            operator.index(side)
        except TypeError:
            raise ValueError(f"{expected}, got {window_size!r}: {side!r} is a {type(side).__name__}") from None
    left, right = (operator.index(side) for side in pair)
    if left < -1 or right < -1:
        raise ValueError(f"window_size: expected values >= -1 (-1 = unbounded), got {window_size!r}")
    return left, right


def ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def strided_band(band: Band, q_start: int, k_start: int, stride: int) -> Band:
    """A position-space band seen in index space when positions are ``start + stride * index``.

    ``d = (q_start - k_start) + stride * (i - j)``, so ``lo <= d <= hi`` becomes
    ``ceil((lo - delta) / stride) <= i - j <= floor((hi - delta) / stride)``.
    """
    delta = q_start - k_start + band.offset
    lo = None if band.lo is None else ceil_div(band.lo - delta, stride)
    hi = None if band.hi is None else (band.hi - delta) // stride
    return Band(lo, hi, 0)


NEG_INF = -math.inf
