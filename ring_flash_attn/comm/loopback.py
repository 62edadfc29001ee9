"""A ring communicator for one process: rank ``rank`` of a ring that exists only in name.

It has :class:`~ring_flash_attn.comm.ring.RingComm`'s interface (``rank``,
``world_size``, ``exchange(send, recv) -> pending``, ``pending.wait()``, ``finish``), so the
ring engine runs unchanged on one device: that is how one rank's whole schedule
is timed on one GPU (benchmarks/ring_step.py) and checked against a real
multi-process run (tests/test_loopback.py).

What each exchange hands back:

* **K/V exchanges** (``kind="kv"``): the K/V block rank ``rank - n`` holds, at
  the n-th exchange of a forward or backward call (n = 1 .. P-1), the same block
  a real ring would deliver, made locally beforehand and copied in.
* **dK/dV exchanges** (``kind="grad"``): a copy of what this rank sends, i.e. as
  if the predecessor had accumulated exactly this rank's partial sums. The
  shape, dtype and memory traffic are those of the real exchange; the values
  are not, so dK/dV of a loopback run are meaningless. out, LSE and dQ depend
  only on K/V exchanges and are exact.

On a GPU the copy runs on a side stream, as a collective would, ordered after
the work queued so far; ``wait()`` makes the current stream wait for it. The
pending exchange holds the tensors until then, so the caching allocator cannot
hand their memory to anything else while the copy may still touch it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .ring import SingleProcessFinish


class PendingLoopback:
    """A copy in flight; ``wait()`` orders the current stream after it."""

    def __init__(self, done_event, tensors):
        self._done = done_event
        self._tensors = tensors  # held until wait(): the side stream may still read/write them

    def wait(self) -> None:
        if self._done is not None:
            torch.cuda.current_stream().wait_event(self._done)
        self._done, self._tensors = None, ()


class LoopbackComm(SingleProcessFinish):
    """Stands in for the ring as seen by rank ``rank``; ``kv_by_rank[r]`` is rank r's stacked K/V [2, B, S, Hk, D]."""

    def __init__(self, rank: int, kv_by_rank: Sequence[torch.Tensor]):
        self.world_size = len(kv_by_rank)
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank: expected 0 <= rank < {self.world_size}, got {rank}")
        self.rank = rank
        self._kv_by_rank = list(kv_by_rank)
        self._kv_exchanges = 0
        device = kv_by_rank[0].device
        self._side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _kv_source(self) -> torch.Tensor:
        # Forward and backward each make P - 1 K/V exchanges; the n-th brings rank (rank - n)'s block.
        hop = self._kv_exchanges % (self.world_size - 1) + 1
        self._kv_exchanges += 1
        return self._kv_by_rank[(self.rank - hop) % self.world_size]

    def exchange(self, send: torch.Tensor, recv: torch.Tensor, kind: str = "kv") -> PendingLoopback:
        if send.shape != recv.shape or send.dtype != recv.dtype:
            raise ValueError(f"recv: expected the shape and dtype of send {tuple(send.shape)} {send.dtype}, "
                             f"got {tuple(recv.shape)} {recv.dtype}")
        if kind not in ("kv", "grad"):
            raise ValueError(f"kind: expected 'kv' or 'grad', got {kind!r}")
        source = self._kv_source() if kind == "kv" else send
        if self._side_stream is None:
            recv.copy_(source)
            return PendingLoopback(None, ())
        self._side_stream.wait_stream(torch.cuda.current_stream())  # send is written, recv no longer read
        with torch.cuda.stream(self._side_stream):
            recv.copy_(source, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return PendingLoopback(done, (send, recv, source))
