"""The public functions, with the names and signatures of zhuzilin/ring-flash-attention.

Tensors are ``[batch, seqlen_local, heads, head_dim]`` (kvpacked: ``kv``
``[batch, seqlen_local, 2, heads_k, head_dim]``; qkvpacked: ``qkv``
``[batch, seqlen_local, 3, heads, head_dim]``), each rank passing its slice of the
sequence in the variant's layout (see :mod:`ring_flash_attn.ring.layouts` and
:func:`ring_flash_attn.shard_sequence`). Returns ``out`` of q's shape, or
``(out, softmax_lse, None)`` with ``return_attn_probs=True`` (``softmax_lse``
float32 ``[batch, heads, seqlen_local]``).

Beyond the replaced project's arguments, two keyword-only extras: ``softcap``
(logit soft-capping, where the kernel backend supports it) and ``backend``
(force a kernel backend; see :mod:`ring_flash_attn.kernels`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from . import agreement
from .comm.ring import RingComm
from .docstrings import compat_docstring
from .kernels import Features, select_backend
from .kernels.mask import Band, check_window
from .ring.allgather import allgather_attention, allgather_calls
from .ring.engine import ContextParallelAttention, RingPlan
from .ring.layouts import Layout, PackedLayout, get_layout
from .ring.planner import layout_needs_band_mask
from .tracing import outside_graphs
from .validation import (backward_head_chunks, check_alibi_slopes, check_cu_seqlens, check_heads_k_stride,
                         check_flag, check_max_seqlen, check_packed_alibi_slopes, check_packed_qkv, check_qkv,
                         check_softcap, check_softmax_scale, check_unsupported, group_rank_and_size)


def serve_as_documents(layout, kernel) -> bool:
    """Whether a packed batch's ring steps are each one document-masked call (ring/documents.py): where the
    backend serves that, and the batch holds several sequences (with one or two, the planner's blocks are
    the same work without the mask)."""
    return (isinstance(layout, PackedLayout) and kernel.serves_documents
            and sum(1 for n in layout.seqlens_local if n) >= MIN_DOCUMENTS)


# A packed batch of at least this many sequences is served by document-masked calls where the backend can.
MIN_DOCUMENTS = 4


@outside_graphs
@agreement.shares_errors
def ring_attention(q, k, v, *, variant: str = "ring", causal: bool = False, softmax_scale: Optional[float] = None,
                   window_size=(-1, -1), softcap: float = 0.0, group: Optional[dist.ProcessGroup] = None,
                   backend: Optional[str] = None, cu_seqlens: Optional[torch.Tensor] = None,
                   exchange: str = "ring", heads_k_stride: Optional[int] = None,
                   alibi_slopes: Optional[torch.Tensor] = None, comm=None):
    """Context-parallel attention of this rank's ``q`` over every rank's ``k``/``v``; returns ``(out, lse)``.

    The engine behind every public function, with all options as keywords.

    Arguments:
        q: (batch, seqlen_local, heads, head_dim); k, v: (batch, seqlen_local, heads_k, head_dim), heads_k
            dividing heads; float16, bfloat16, float32 or float64, this rank's slices in ``variant``'s layout.
        variant: "ring", "zigzag" or "stripe" (a :class:`~ring_flash_attn.ring.layouts.Layout` also works).
        causal, softmax_scale, window_size, softcap, alibi_slopes, group, backend: as in
            :func:`ring_flash_attn.ring_flash_attn_func` (causal mask and windows by true token positions;
            ``alibi_slopes`` float32 (heads,) or (batch, heads), served by the "reference" backend).
        cu_seqlens: this rank's cumulative lengths of packed sequences (int32 or int64; a repeated offset
            is a sequence of length 0); q/k/v are then
            (total_tokens_local, heads, head_dim), each sequence is laid out over the ranks by ``variant``
            on its own and no attention crosses a sequence boundary.
        exchange: how K/V reach every rank: "ring" (passed around the ring, flat memory) or "allgather"
            (llama3 style: all-gathered ``heads_k_stride`` K/V heads at a time, dK/dV reduce-scattered).
        heads_k_stride: with exchange="allgather", K/V heads gathered at a time (default: all).
        comm: replaces the process-group communicator of the ring exchange (e.g. a loopback one for
            single-device runs).

    Returns:
        (out, lse): out shaped like q in q's dtype; lse float32 (batch, heads, seqlen_local), or
        (heads, total_tokens_local) with cu_seqlens. Both are differentiable (a gradient on lse makes the
        backward run on twice the heads: :func:`~ring_flash_attn.ring.engine.lse_gradient_inputs`).

    Raises:
        ValueError, TypeError naming the argument, NotImplementedError for what the backend cannot serve:
        all validation happens here, before any communication, alike on every rank.
    """
    if exchange not in ("ring", "allgather"):
        raise ValueError(f"exchange: expected 'ring' or 'allgather', got {exchange!r}")
    if cu_seqlens is not None:
        check_packed_qkv(q, k, v)
        seqlens = check_cu_seqlens(cu_seqlens, q.shape[0])
        check_packed_alibi_slopes(alibi_slopes, q)
        out, lse = ring_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), variant=PackedLayout(
            get_layout(variant), seqlens), causal=causal, softmax_scale=softmax_scale, window_size=window_size,
            softcap=softcap, group=group, backend=backend, exchange=exchange, heads_k_stride=heads_k_stride,
            alibi_slopes=alibi_slopes, comm=comm)
        return out.squeeze(0), lse.squeeze(0)
    check_qkv(q, k, v)
    causal = check_flag(causal, "causal")
    alibi_slopes = check_alibi_slopes(alibi_slopes, q)
    window = check_window(window_size)
    softcap = check_softcap(softcap)
    scale = check_softmax_scale(softmax_scale, q.shape[-1])
    layout = variant if isinstance(variant, Layout) else get_layout(variant)
    if exchange == "allgather":
        return _allgather(q, k, v, layout, causal=causal, window=window, softmax_scale=scale, softcap=softcap,
                          group=group, backend=backend, heads_k_stride=heads_k_stride, alibi_slopes=alibi_slopes)
    agree_here = comm is None  # a stand-in communicator (the loopback) has no ranks to agree with
    if agree_here:
        comm = RingComm(group)
    layout.check(q.shape[1], comm.world_size, causal)
    band = Band.from_kernel_args(causal, window)
    features = Features(q.device.type, q.dtype, q.shape[-1],
                        band=layout_needs_band_mask(layout, comm.world_size, q.shape[1], band),
                        softcap=softcap > 0, alibi=alibi_slopes is not None)
    kernel = select_backend(features, backend)
    documents = serve_as_documents(layout, kernel)
    plan = RingPlan(layout=layout, band=band, scale=scale, softcap=softcap, backend=kernel, comm=comm,
                    alibi_slopes=alibi_slopes, documents=documents,
                    varlen=(not documents and isinstance(layout, PackedLayout) and q.shape[0] == 1
                            and kernel.serves_varlen(features)),
                    backward_head_chunks=backward_head_chunks(k.shape[2]))
    if agree_here:
        agreement.agree(group, agreement.describe(
            q, k, v, exchange="ring", causal=causal, window_size=window, softmax_scale=scale, softcap=softcap,
            alibi_slopes=None if alibi_slopes is None else tuple(alibi_slopes.shape), **agreement.layout_items(layout)),
            q.device)
    return ContextParallelAttention.apply(q, k, v, plan)


def _allgather(q, k, v, layout, *, causal, window, softmax_scale, softcap, group, backend, heads_k_stride,
               alibi_slopes):
    """The all-gather exchange: the batch is packed into one row of sequences, so tasks can index the gathered K/V."""
    rank, world_size = group_rank_and_size(group)
    heads_k_stride = check_heads_k_stride(k.shape[2] if heads_k_stride is None else heads_k_stride, k.shape[2])
    batch, seqlen = q.shape[:2]
    layout.check(seqlen, world_size, causal)
    packed = layout if batch == 1 and isinstance(layout, PackedLayout) else PackedLayout(layout, (seqlen,) * batch)
    flat = [t.reshape(1, batch * seqlen, *t.shape[2:]) for t in (q, k, v)]
    if alibi_slopes is not None and alibi_slopes.dim() == 2 and batch > 1:
        raise NotImplementedError("alibi_slopes: per-batch slopes ([batch, heads]) with exchange='allgather' "
                                  "(which packs the batch into one row); pass one slope per head")
    band, keep_positions = Band.from_kernel_args(causal, window), alibi_slopes is not None
    needs_band = layout_needs_band_mask(packed, world_size, batch * seqlen, band)
    features = Features(q.device.type, q.dtype, q.shape[-1], band=needs_band, softcap=softcap > 0,
                        alibi=alibi_slopes is not None)
    kernel = select_backend(features, backend)
    calls = allgather_calls(packed, rank, world_size, batch * seqlen, band, keep_positions,
                            varlen=kernel.serves_varlen(features))
    shared = dict(agreement.layout_items(layout), causal=causal, window_size=window, batch_seqlen=(batch, seqlen))
    out, lse = allgather_attention(*flat, calls, kernel=kernel, softmax_scale=softmax_scale, softcap=softcap,
                                   group=group, heads_k_stride=heads_k_stride, world_size=world_size,
                                   alibi_slopes=alibi_slopes, shared=shared)
    heads = q.shape[2]
    return out.view(q.shape), lse.view(heads, batch, seqlen).transpose(0, 1)


@outside_graphs
@agreement.shares_errors
def _compat_call(q, k, v, variant, dropout_p, softmax_scale, causal, window_size, alibi_slopes, return_attn_probs,
                 group, softcap, backend):
    check_unsupported(dropout_p)
    out, lse = ring_attention(q, k, v, variant=variant, causal=causal, softmax_scale=softmax_scale,
                              window_size=window_size, softcap=softcap, group=group, backend=backend,
                              alibi_slopes=alibi_slopes)
    return (out, lse, None) if return_attn_probs else out


def _unpack(packed: torch.Tensor, name: str, parts: int, packed_dim: int = 2):
    """Split a kv/qkv-packed tensor; ``packed_dim`` 2 for [batch, seqlen, parts, ...], 1 for varlen [tokens, parts, ...]."""
    lead = "batch, seqlen" if packed_dim == 2 else "total_tokens"
    if not isinstance(packed, torch.Tensor) or packed.dim() != packed_dim + 3 or packed.shape[packed_dim] != parts:
        shape = tuple(packed.shape) if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"{name}: expected [{lead}, {parts}, heads, head_dim], got {shape}")
    return packed.unbind(dim=packed_dim)


def _api_prefix(variant: str) -> str:
    """The replaced project's function-name prefix for a variant."""
    return {"ring": "ring_flash_attn", "zigzag": "zigzag_ring_flash_attn"}.get(variant, f"{variant}_flash_attn")


def _make_api(variant: str):
    """The func / kvpacked_func / qkvpacked_func triple of one variant. ``deterministic`` is accepted for
    compatibility: the engine's reduction order is fixed, so results repeat on the same ranks and backend."""

    def func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
             deterministic=False, return_attn_probs=False, group=None, *, softcap=0.0, backend=None):
        return _compat_call(q, k, v, variant, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                            return_attn_probs, group, softcap, backend)

    def kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                      alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None, *, softcap=0.0,
                      backend=None):
        k, v = _unpack(kv, "kv", 2)
        return _compat_call(q, k, v, variant, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                            return_attn_probs, group, softcap, backend)

    def qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                       alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None, *, softcap=0.0,
                       backend=None):
        q, k, v = _unpack(qkv, "qkv", 3)
        return _compat_call(q, k, v, variant, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                            return_attn_probs, group, softcap, backend)

    prefix = _api_prefix(variant)
    for fn, suffix in ((func, "func"), (kvpacked_func, "kvpacked_func"), (qkvpacked_func, "qkvpacked_func")):
        fn.__name__ = fn.__qualname__ = f"{prefix}_{suffix}"
        fn.__doc__ = compat_docstring(fn.__name__, variant, suffix)
    return func, kvpacked_func, qkvpacked_func


ring_flash_attn_func, ring_flash_attn_kvpacked_func, ring_flash_attn_qkvpacked_func = _make_api("ring")
(zigzag_ring_flash_attn_func, zigzag_ring_flash_attn_kvpacked_func,
 zigzag_ring_flash_attn_qkvpacked_func) = _make_api("zigzag")
stripe_flash_attn_func, stripe_flash_attn_kvpacked_func, stripe_flash_attn_qkvpacked_func = _make_api("stripe")


def _make_varlen_api(variant: str):
    """The varlen triple of one variant: packed sequences ``[total_tokens_local, heads, head_dim]`` with this
    rank's ``cu_seqlens`` (each sequence split over the ranks by the variant's layout)."""

    @outside_graphs
    @agreement.shares_errors
    def call(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
             return_attn_probs, group, softcap, backend):
        check_unsupported(dropout_p)
        check_packed_qkv(q, k, v)
        check_cu_seqlens(cu_seqlens, q.shape[0])  # before max_seqlen, which reads lengths off cu_seqlens
        check_max_seqlen(max_seqlen, cu_seqlens)
        out, lse = ring_attention(q, k, v, variant=variant, causal=causal, softmax_scale=softmax_scale,
                                  window_size=window_size, softcap=softcap, group=group, backend=backend,
                                  cu_seqlens=cu_seqlens, alibi_slopes=alibi_slopes)
        return (out, lse, None) if return_attn_probs else out

    def varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None,
                    *, softcap=0.0, backend=None):
        return call(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                    return_attn_probs, group, softcap, backend)

    def varlen_kvpacked_func(q, kv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), alibi_slopes=None, deterministic=False, return_attn_probs=False,
                             group=None, *, softcap=0.0, backend=None):
        k, v = _unpack(kv, "kv", 2, packed_dim=1)
        return call(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                    return_attn_probs, group, softcap, backend)

    def varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), alibi_slopes=None, deterministic=False, return_attn_probs=False,
                              group=None, *, softcap=0.0, backend=None):
        q, k, v = _unpack(qkv, "qkv", 3, packed_dim=1)
        return call(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                    return_attn_probs, group, softcap, backend)

    prefix = _api_prefix(variant)
    for fn, suffix in ((varlen_func, "varlen_func"), (varlen_kvpacked_func, "varlen_kvpacked_func"),
                       (varlen_qkvpacked_func, "varlen_qkvpacked_func")):
        fn.__name__ = fn.__qualname__ = f"{prefix}_{suffix}"
        fn.__doc__ = compat_docstring(fn.__name__, variant, suffix)
    return varlen_func, varlen_kvpacked_func, varlen_qkvpacked_func


ring_flash_attn_varlen_func, ring_flash_attn_varlen_kvpacked_func, ring_flash_attn_varlen_qkvpacked_func = \
    _make_varlen_api("ring")
(zigzag_ring_flash_attn_varlen_func, zigzag_ring_flash_attn_varlen_kvpacked_func,
 zigzag_ring_flash_attn_varlen_qkvpacked_func) = _make_varlen_api("zigzag")
