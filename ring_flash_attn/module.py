"""``RingAttention`` as an ``nn.Module``, and helpers to go from a full batch to per-rank slices and back."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .comm.collectives import all_gather_sequence
from .functional import ring_attention
from .ring.layouts import get_layout
from .validation import group_rank_and_size


def shard_sequence(x: torch.Tensor, variant: str, rank: int, world_size: int, dim: int = 1) -> torch.Tensor:
    """This rank's slice of the full sequence ``x`` (sequence along ``dim``) in ``variant``'s layout.

    ``zigzag`` and ``stripe`` reorder tokens; the slice is what the ring functions expect on that rank.
    """
    return get_layout(variant).shard(x, rank, world_size, dim)


def unshard_sequence(shards, variant: str, dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's slice (a list in group-rank order): inverse of :func:`shard_sequence`."""
    return get_layout(variant).unshard(list(shards), dim)


def gather_sequence(x_local: torch.Tensor, variant: str, group: Optional[dist.ProcessGroup] = None,
                    dim: int = 1) -> torch.Tensor:
    """All-gather every rank's slice and undo the layout: the full sequence on every rank.

    Differentiable (the gradient flows back to each rank's slice).
    """
    gathered = all_gather_sequence(x_local.movedim(dim, 1), group)
    shards = gathered.chunk(dist.get_world_size(group), dim=1)
    return unshard_sequence(shards, variant, 1).movedim(1, dim)


class RingAttention(nn.Module):
    """Attention over a sequence split across the ranks of ``group``.

    ``forward(q, k, v)`` takes this rank's ``[batch, seqlen_local, heads, head_dim]``
    slices (K/V may have fewer heads: GQA) in the variant's layout and returns this
    rank's output slice. Use :meth:`shard` / :meth:`gather` to go from a full
    sequence to slices and back.
    """

    def __init__(self, variant: str = "zigzag", causal: bool = True, softmax_scale: Optional[float] = None,
                 window_size=(-1, -1), softcap: float = 0.0, group: Optional[dist.ProcessGroup] = None,
                 backend: Optional[str] = None, exchange: str = "ring", heads_k_stride: Optional[int] = None):
        super().__init__()
        get_layout(variant).check(2, 1, causal)  # fail at construction on a variant/causal mismatch
        if exchange not in ("ring", "allgather"):
            raise ValueError(f"exchange: expected 'ring' or 'allgather' (llama3 style), got {exchange!r}")
        self.variant, self.causal, self.softmax_scale = variant, causal, softmax_scale
        self.window_size, self.softcap, self.group, self.backend = tuple(window_size), softcap, group, backend
        self.exchange, self.heads_k_stride = exchange, heads_k_stride

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                return_lse: bool = False):
        """``cu_seqlens``: this rank's cumulative lengths of packed sequences (q/k/v then ``[tokens, heads, dim]``)."""
        out, lse = ring_attention(q, k, v, variant=self.variant, causal=self.causal, softmax_scale=self.softmax_scale,
                                  window_size=self.window_size, softcap=self.softcap, group=self.group,
                                  backend=self.backend, cu_seqlens=cu_seqlens, exchange=self.exchange,
                                  heads_k_stride=self.heads_k_stride)
        return (out, lse) if return_lse else out

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return shard_sequence(x, self.variant, *group_rank_and_size(self.group), dim)

    def gather(self, x_local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return gather_sequence(x_local, self.variant, self.group, dim)

    def extra_repr(self) -> str:
        return (f"variant={self.variant!r}, exchange={self.exchange!r}, causal={self.causal}, "
                f"window_size={self.window_size}, softcap={self.softcap}, backend={self.backend!r}")
