"""Point-to-point exchange around a ring of ranks.

Each rank sends to its successor and receives from its predecessor in a
process group; group-local ranks are mapped to global ranks for the P2P calls.
Sends are posted before receives. The caller owns the buffers: it passes the
tensor to send and the (preallocated) tensor to receive into, computes while the
exchange is in flight, and calls ``wait()`` before touching the received tensor
or reusing the sent one. Keeping the buffers alive until then is what makes the
overlap safe: the collective backend may still read/write them on its own
stream or thread.

On CPU (gloo, where waiting blocks anyway) each wait is bounded
(:func:`ring_flash_attn.agreement.wait_bounded`), so a rank that never arrives is
an error within seconds instead of at the process-group timeout. ``finish``
tells every rank whether any rank's compute failed during the call.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .. import agreement


class PendingExchange:
    """An exchange in flight; ``wait()`` returns once both directions are done."""

    def __init__(self, works, tensors, peers):
        self._works = works
        self._tensors = tensors  # held so the buffers outlive the transfer
        self._peers = peers

    def wait(self) -> None:
        if self._tensors and self._tensors[0].device.type == "cpu":
            send_peer, recv_peer = self._peers
            agreement.wait_bounded(self._works,
                                   f"ring exchange with ranks {send_peer} (send) and {recv_peer} (receive)")
        else:
            for work in self._works:
                work.wait()
        self._works, self._tensors = [], ()


class RingComm:
    """Send to ``rank + 1``, receive from ``rank - 1`` within ``group`` (None = the default group)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        from ..validation import group_rank_and_size

        self.group = group
        self.rank, self.world_size = group_rank_and_size(group)
        self.send_peer = self._global((self.rank + 1) % self.world_size)
        self.recv_peer = self._global((self.rank - 1) % self.world_size)

    def _global(self, group_rank: int) -> int:
        if self.group is None or self.group is dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def exchange(self, send: torch.Tensor, recv: torch.Tensor, kind: str = "kv") -> PendingExchange:
        """Start sending ``send`` to the successor and receiving the predecessor's into ``recv``.

        ``kind`` says what travels: ``"kv"`` (K/V blocks) or ``"grad"`` (dK/dV partial sums). The process
        group moves both alike; stand-in communicators (the loopback) need to tell them apart.
        """
        ops = [dist.P2POp(dist.isend, send, self.send_peer, self.group),
               dist.P2POp(dist.irecv, recv, self.recv_peer, self.group)]
        return PendingExchange(dist.batch_isend_irecv(ops), (send, recv), (self.send_peer, self.recv_peer))

    def finish(self, failure, what: str, device: torch.device) -> None:
        """After the last exchange of a call: every rank raises if any rank's compute failed (``failure``: ours)."""
        agreement.finish(self.group, failure, device, what)


class SingleProcessFinish:
    """``finish`` for a communicator with no other process to tell (the loopback, a ring of one rank, test and
    benchmark stand-ins): this rank's compute error, if any, raises there."""

    def finish(self, failure, what: str, device: torch.device) -> None:
        if failure is not None:
            raise failure.error
