"""All-gather ("llama3") context parallelism over packed sequences, with the replaced project's API.

``llama3_flash_attn_varlen_func`` keeps that project's contract: the packed batch
(``cu_seqlens`` over ``total`` tokens) is split into P contiguous pieces, rank r
holding tokens ``[r*total/P, (r+1)*total/P)``; sequences may cross rank
boundaries and may be shorter than P. ``llama3_flash_attn_prepare_cu_seqlens``
gives each rank the arguments for its piece. Masks use true token positions, so
sliding windows are right for sequences that start on an earlier rank.

``zigzag_llama3_flash_attn_varlen_func`` is the load-balanced form (new here):
the same all-gather exchange over the zigzag layout of each sequence (the local
inputs and ``cu_seqlens`` of ``zigzag_ring_flash_attn_varlen_func``), so every
rank does the same causal work.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import accumulate

import torch

from . import agreement
from .docstrings import llama3_docstring, prepare_cu_seqlens_docstring, zigzag_llama3_docstring
from .functional import ring_attention
from .kernels.mask import Band, check_window
from .ring.allgather import allgather_attention
from .kernels import Features, select_backend
from .ring.batching import batch_calls, varlen_calls
from .ring.planner import PLAN_CACHES, BlockTask, needs_band_mask
from .tracing import outside_graphs
from .validation import (check_cu_seqlens, check_flag, check_heads_k_stride, check_max_seqlen,
                         check_packed_alibi_slopes, check_packed_qkv, check_softcap, check_softmax_scale,
                         check_unsupported, group_rank_and_size)


def llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, causal, rank, world_size):
    """This rank's ``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice)``.

    ``cu_seqlens`` covers the whole packed batch. Queries are the rank's contiguous
    piece; keys (a slice of the gathered K/V) run from the start of the first
    sequence the piece touches to the piece's end (causal) or to the end of the
    last sequence it touches (non-causal).
    """
    bounds = [0, *accumulate(check_cu_seqlens(cu_seqlens, None))]
    total = bounds[-1]
    if total == 0 or total % world_size:
        raise ValueError(f"cu_seqlens: the packed length {total} must split evenly over {world_size} ranks, "
                         f"at least one token each")
    piece = total // world_size
    q_start, q_stop = rank * piece, (rank + 1) * piece
    # a sequence of length 0 inside the piece stays in (a repeated offset, as given); one on its edge is left out
    touched = [(a, b) for a, b in zip(bounds, bounds[1:]) if a < q_stop and b > q_start]
    k_start = touched[0][0]
    k_stop = q_stop if causal else touched[-1][1]
    cu_q = [0] + [min(b, q_stop) - q_start for _, b in touched]
    cu_k = [0] + [min(b, k_stop) - k_start for _, b in touched]
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int32, device=cu_seqlens.device)  # noqa: E731
    max_q = max(b - a for a, b in zip(cu_q, cu_q[1:]))
    max_k = max(b - a for a, b in zip(cu_k, cu_k[1:]))
    return as_tensor(cu_q), as_tensor(cu_k), max_q, max_k, slice(k_start, k_stop)


@lru_cache(maxsize=64)  # as ring/batching.step_calls: one batch, reused by its layers and its backward
def _llama3_tasks(cu_q: tuple, cu_k: tuple, k_start: int, q_start: int, band: Band, keep_positions: bool):
    """``(blocks, whether one needs a band mask)`` of this rank's sequence pieces (:func:`_llama3_blocks`)."""
    tasks = tuple(_llama3_blocks(cu_q, cu_k, k_start, q_start, band, keep_positions))
    return tasks, needs_band_mask(tasks)


@lru_cache(maxsize=64)  # keyed by the pieces, as _llama3_tasks (hashing thousands of blocks would cost more)
def _llama3_calls(cu_q: tuple, cu_k: tuple, k_start: int, q_start: int, band: Band, keep_positions: bool,
                  varlen: bool):
    """The blocks as kernel calls: with ``varlen`` (a backend with a variable-length kernel) the small unmasked
    blocks in one call and the small causal squares in another, else the small ones of one shape batched
    (ring/batching.py)."""
    tasks, _ = _llama3_tasks(cu_q, cu_k, k_start, q_start, band, keep_positions)
    return varlen_calls(tasks) if varlen else batch_calls(tasks)


PLAN_CACHES.extend([_llama3_tasks, _llama3_calls])


def _llama3_blocks(cu_q, cu_k, k_start: int, q_start: int, band: Band, keep_positions: bool):
    """The blocks of each sequence piece, positions taken from where the piece really sits (``k_start``: where
    this rank's keys begin in the gathered K/V).

    A causal piece sees its sequence's earlier keys whole and its own keys causally: a query block at offset
    ``o`` from its keys (bottom-right causal when its keys end with it) is the unmasked block of the first ``o``
    keys and the causal square of the next ``q`` keys, each a plain call of PyTorch's fused ops (a bottom-right
    causal block would need a band-mask kernel)."""
    tasks = []
    for (qa, qb), (ka, kb) in zip(zip(cu_q, cu_q[1:]), zip(cu_k, cu_k[1:])):
        k_lo, k_hi = k_start + ka, k_start + kb
        block = Band(band.lo, band.hi, (q_start + qa) - k_lo)
        rows = qb - qa
        if block.is_empty(rows, kb - ka):
            continue
        if block.is_full(rows, kb - ka):
            tasks.append(BlockTask(qa, qb, k_lo, k_hi, None, (block.offset, 1) if keep_positions else None))
            continue
        offset = block.offset
        if block.lo == 0 and block.hi is None and offset >= 0 and k_lo + offset + rows <= k_hi:
            if offset:
                tasks.append(BlockTask(qa, qb, k_lo, k_lo + offset, None, (offset, 1) if keep_positions else None))
            tasks.append(BlockTask(qa, qb, k_lo + offset, k_lo + offset + rows, Band(0, None, 0),
                                   (0, 1) if keep_positions else None))
            continue
        tasks.append(BlockTask(qa, qb, k_lo, k_hi, block, (block.offset, 1) if keep_positions else None))
    return tasks


@outside_graphs
@agreement.shares_errors
def llama3_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
                                  local_k_slice, dropout_p=0.0, softmax_scale=None, causal=False,
                                  window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                  return_attn_probs=False, group=None, *, softcap=0.0, backend=None):
    """All-gather attention for this rank's contiguous piece of a packed batch; arguments from
    :func:`llama3_flash_attn_prepare_cu_seqlens`. q ``[tokens_local, heads, head_dim]``; lse ``[heads, tokens_local]``."""
    check_unsupported(dropout_p)
    check_packed_qkv(q, k, v)
    alibi_slopes = check_packed_alibi_slopes(alibi_slopes, q)
    window, softcap = check_window(window_size), check_softcap(softcap)
    softmax_scale, causal = check_softmax_scale(softmax_scale, q.shape[-1]), check_flag(causal, "causal")
    check_heads_k_stride(heads_k_stride, k.shape[1])
    rank, world_size = group_rank_and_size(group)
    q_lengths = check_cu_seqlens(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
    if not isinstance(local_k_slice, slice) or not 0 <= local_k_slice.start <= local_k_slice.stop <= world_size * k.shape[0]:
        raise ValueError(f"local_k_slice: expected a slice within the {world_size * k.shape[0]} gathered tokens, "
                         f"got {local_k_slice!r}")
    k_lengths = check_cu_seqlens(cu_seqlens_k, local_k_slice.stop - local_k_slice.start, "cu_seqlens_k")
    if len(k_lengths) != len(q_lengths):
        raise ValueError(f"cu_seqlens_k: expected {len(q_lengths) + 1} entries like cu_seqlens_q, "
                         f"got {len(k_lengths) + 1}")
    band, keep_positions = Band.from_kernel_args(causal, window), alibi_slopes is not None
    cu_q, cu_k = (0, *accumulate(q_lengths)), (0, *accumulate(k_lengths))
    # Causal pieces are unmasked blocks and causal squares (_llama3_blocks), which PyTorch's fused ops serve; a
    # window needs a band-mask kernel. Decided from the arguments alike on every rank (which do not know where the
    # others' pieces sit), so that all choose the same backend; only keys that do not end with their queries
    # (arguments made by hand, not by llama3_flash_attn_prepare_cu_seqlens) leave a band on some rank.
    pieces = (cu_q, cu_k, local_k_slice.start, rank * q.shape[0], band, keep_positions)
    needs_band = window != (-1, -1) or _llama3_tasks(*pieces)[1]
    features = Features(q.device.type, q.dtype, q.shape[-1], band=needs_band, softcap=softcap > 0,
                        alibi=alibi_slopes is not None)
    kernel = select_backend(features, backend)
    calls = _llama3_calls(*pieces, kernel.serves_varlen(features))
    out, lse = allgather_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), calls, kernel=kernel,
                                   softmax_scale=softmax_scale, softcap=softcap, group=group,
                                   heads_k_stride=heads_k_stride, world_size=world_size, alibi_slopes=alibi_slopes,
                                   shared=dict(variant="llama3", causal=causal, window_size=window))
    out, lse = out.squeeze(0), lse.squeeze(0)
    return (out, lse, None) if return_attn_probs else out


@outside_graphs
@agreement.shares_errors
def zigzag_llama3_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, heads_k_stride, dropout_p=0.0,
                                         softmax_scale=None, causal=True, window_size=(-1, -1), alibi_slopes=None,
                                         deterministic=False, return_attn_probs=False, group=None, *, softcap=0.0,
                                         backend=None):
    """Load-balanced all-gather attention: inputs laid out as for :func:`zigzag_ring_flash_attn_varlen_func`."""
    check_unsupported(dropout_p)
    check_packed_qkv(q, k, v)
    check_cu_seqlens(cu_seqlens, q.shape[0])  # before max_seqlen, which reads lengths off cu_seqlens
    check_max_seqlen(max_seqlen, cu_seqlens)
    out, lse = ring_attention(q, k, v, variant="zigzag", causal=causal, softmax_scale=softmax_scale,
                              window_size=window_size, softcap=softcap, group=group, backend=backend,
                              cu_seqlens=cu_seqlens, exchange="allgather", heads_k_stride=heads_k_stride,
                              alibi_slopes=alibi_slopes)
    return (out, lse, None) if return_attn_probs else out


def _packed(name, tensor, parts):
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4 or tensor.shape[1] != parts:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name}: expected [total_tokens, {parts}, heads, head_dim], got {shape}")
    return tensor.unbind(1)


def llama3_flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                           heads_k_stride, local_k_slice, dropout_p=0.0, softmax_scale=None,
                                           causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                           return_attn_probs=False, group=None, *, softcap=0.0, backend=None):
    k, v = _packed("kv", kv, 2)
    return llama3_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         heads_k_stride, local_k_slice, dropout_p, softmax_scale, causal, window_size,
                                         alibi_slopes, deterministic, return_attn_probs, group, softcap=softcap,
                                         backend=backend)


def llama3_flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            heads_k_stride, local_k_slice, dropout_p=0.0, softmax_scale=None,
                                            causal=False, window_size=(-1, -1), alibi_slopes=None,
                                            deterministic=False, return_attn_probs=False, group=None, *, softcap=0.0,
                                            backend=None):
    q, k, v = _packed("qkv", qkv, 3)
    return llama3_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         heads_k_stride, local_k_slice, dropout_p, softmax_scale, causal, window_size,
                                         alibi_slopes, deterministic, return_attn_probs, group, softcap=softcap,
                                         backend=backend)


llama3_flash_attn_prepare_cu_seqlens.__doc__ = prepare_cu_seqlens_docstring()
zigzag_llama3_flash_attn_varlen_func.__doc__ = zigzag_llama3_docstring()
for _fn, _suffix in ((llama3_flash_attn_varlen_func, "varlen_func"),
                     (llama3_flash_attn_varlen_kvpacked_func, "varlen_kvpacked_func"),
                     (llama3_flash_attn_varlen_qkvpacked_func, "varlen_qkvpacked_func")):
    _fn.__doc__ = llama3_docstring(_fn.__name__, _suffix)
