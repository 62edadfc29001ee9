"""``RingAttention`` as an ``nn.Module``, and helpers to go from a full batch to per-rank slices and back."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from . import agreement
from .comm.collectives import all_gather_sequence
from .functional import ring_attention
from .ring.layouts import get_layout
from .ulysses import usp_attention, usp_process_groups
from .kernels.mask import check_window
from .tracing import outside_graphs
from .validation import check_dim, check_flag, check_softmax_scale, group_rank_and_size


def shard_sequence(x: torch.Tensor, variant: str, rank: int, world_size: int, dim: int = 1) -> torch.Tensor:
    """This rank's slice of the full sequence ``x`` (sequence along ``dim``) in ``variant``'s layout.

    ``zigzag`` and ``stripe`` reorder tokens; the slice is what the ring functions expect on that rank.
    """
    return get_layout(variant).shard(x, rank, world_size, dim)


def unshard_sequence(shards, variant: str, dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's slice (a list in group-rank order): inverse of :func:`shard_sequence`."""
    return get_layout(variant).unshard(list(shards), dim)


@outside_graphs
@agreement.shares_errors
def gather_sequence(x_local: torch.Tensor, variant: str, group: Optional[dist.ProcessGroup] = None,
                    dim: int = 1) -> torch.Tensor:
    """All-gather every rank's slice and undo the layout: the full sequence on every rank.

    Differentiable (the gradient flows back to each rank's slice).
    """
    get_layout(variant)
    dim = check_dim(dim, x_local, "x_local", min_dims=2)
    gathered = all_gather_sequence(x_local.movedim(dim, 1), group)
    shards = gathered.chunk(dist.get_world_size(group), dim=1)
    return unshard_sequence(shards, variant, 1).movedim(1, dim)


class RingAttention(nn.Module):
    """Attention over a sequence split across the ranks of ``group``: a drop-in for a model's attention core.

    Constructor arguments (each also an attribute):
        variant: "ring", "zigzag" or "stripe": which tokens each rank holds (see :meth:`shard`); zigzag and
            stripe balance causal work and need ``causal=True``.
        causal: bool: causal mask by true token positions across ranks.
        softmax_scale: float or None: scaling of QK^T (default 1 / sqrt(head_dim)).
        window_size: (left, right): sliding window by true positions, -1 = unbounded.
        softcap: float: logit soft-capping (0 = off).
        group: torch.distributed.ProcessGroup or None: the context-parallel ranks (default: the world).
        backend: str or None: force a kernel backend ("sdpa", "triton", "sycl", "reference").
        exchange: "ring" (K/V passed around the ring, flat memory) or "allgather" (llama3 style).
        heads_k_stride: int or None: with exchange="allgather", K/V heads gathered at a time.
        ulysses_size: int: 1 for ring attention alone; U > 1 splits the group into a U x (P / U) mesh
            (Ulysses all-to-all by heads over U ranks, the ring over the rest: USP); heads must divide by U.

    ``forward(q, k, v, cu_seqlens=None, return_lse=False)``:
        q: (batch, seqlen_local, heads, head_dim); k, v: (batch, seqlen_local, heads_k, head_dim), heads_k
            dividing heads (GQA/MQA); this rank's slices in the variant's layout, float16, bfloat16,
            float32 or float64. With ``cu_seqlens`` (this rank's int32 cumulative lengths of packed
            sequences) q/k/v are (total_tokens_local, heads, head_dim) and no attention crosses sequences.
        Returns this rank's output, shaped like q; with ``return_lse=True`` also the float32 log-sum-exp,
        (batch, heads, seqlen_local) or (heads, total_tokens_local) with cu_seqlens (differentiable).
        Raises ValueError/TypeError naming the argument on every rank before any communication, and
        NotImplementedError for what the chosen backend cannot serve.

    :meth:`shard` / :meth:`gather` go from a full sequence to this rank's slice and back (the gather is
    differentiable).
    """

    def __init__(self, variant: str = "zigzag", causal: bool = True, softmax_scale: Optional[float] = None,
                 window_size=(-1, -1), softcap: float = 0.0, group: Optional[dist.ProcessGroup] = None,
                 backend: Optional[str] = None, exchange: str = "ring", heads_k_stride: Optional[int] = None,
                 ulysses_size: int = 1):
        super().__init__()
        causal = check_flag(causal, "causal")
        get_layout(variant).check(2, 1, causal)  # fail at construction on a variant/causal mismatch
        if exchange not in ("ring", "allgather"):
            raise ValueError(f"exchange: expected 'ring' or 'allgather' (llama3 style), got {exchange!r}")
        if ulysses_size != 1 and exchange != "ring":
            raise ValueError(f"exchange: with ulysses_size={ulysses_size} the ring dimension runs the ring "
                             f"exchange; expected 'ring', got {exchange!r}")
        # ulysses_size > 1: a ulysses x ring mesh over the group (USP); the layout stays the variant's over the
        # whole group, so shard/gather below serve it unchanged. Creating the mesh's groups is collective.
        self.usp = usp_process_groups(ulysses_size, group) if ulysses_size != 1 else None
        if softmax_scale is not None:  # None: 1 / sqrt(head_dim), known at the first call
            check_softmax_scale(softmax_scale, head_dim=1)
        self.variant, self.causal, self.softmax_scale = variant, causal, softmax_scale
        self.window_size, self.softcap, self.group, self.backend = check_window(window_size), softcap, group, backend
        self.exchange, self.heads_k_stride = exchange, heads_k_stride

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                return_lse: bool = False):
        """``cu_seqlens``: this rank's cumulative lengths of packed sequences (q/k/v then ``[tokens, heads, dim]``)."""
        if self.usp is not None:
            out, lse = usp_attention(q, k, v, **self.usp.attention_groups(), variant=self.variant, causal=self.causal,
                                     softmax_scale=self.softmax_scale, window_size=self.window_size,
                                     softcap=self.softcap, backend=self.backend, cu_seqlens=cu_seqlens)
            return (out, lse) if return_lse else out
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
        ulysses = f"ulysses_size={self.usp.ulysses_size}, " if self.usp is not None else ""
        return (f"variant={self.variant!r}, {ulysses}exchange={self.exchange!r}, causal={self.causal}, "
                f"window_size={self.window_size}, softcap={self.softcap}, backend={self.backend!r}")
