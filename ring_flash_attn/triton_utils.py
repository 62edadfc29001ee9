"""zhuzilin/ring-flash-attention's ``ring_flash_attn.triton_utils``: converting a variable-length batch's LSE
between flash-attn's padded layout ``[batch, heads, max_seqlen]`` (flash-attn < 2.6.x varlen) and its packed
layout ``[heads, total_tokens]``.

The replaced project runs these as Triton kernels on CUDA; here they are two indexing ops, so they run on any
device (and need no Triton). ``ring_flash_attn.utils`` exports the same functions, as there.
"""

from __future__ import annotations

import torch

__all__ = ["flatten_varlen_lse", "unflatten_varlen_lse"]


def _token_index(cu_seqlens: torch.Tensor, what: str):
    """(sequence, position in it) of every token, from ``cu_seqlens`` ``[batch + 1]``."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens: expected integer [batch + 1] offsets, got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)} ({what})")
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    if bool((lengths < 0).any()) or int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0, got {cu_seqlens.tolist()} ({what})")
    sequence = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    position = torch.arange(sequence.numel(), device=cu.device) - cu[sequence]
    return sequence, position, int(lengths.max())


def flatten_varlen_lse(lse: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``lse`` ``[batch, heads, max_seqlen]`` (sequence ``i``'s rows first in row ``i``) -> ``[heads, total]``,
    the sequences one after the other as ``cu_seqlens`` ``[batch + 1]`` lays them out."""
    sequence, position, longest = _token_index(cu_seqlens.to(lse.device), "flatten_varlen_lse")
    if lse.dim() != 3 or lse.shape[0] != cu_seqlens.numel() - 1 or lse.shape[2] < longest:
        raise ValueError(f"lse: expected [batch={cu_seqlens.numel() - 1}, heads, max_seqlen >= {longest}], got "
                         f"{tuple(lse.shape)}")
    return lse[sequence, :, position].transpose(0, 1).contiguous()


def unflatten_varlen_lse(lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """``lse`` ``[total, heads]`` or ``[total, heads, 1]`` (token-major, as the running LSE of
    :func:`ring_flash_attn.utils.update_out_and_lse`) -> ``[batch, heads, max_seqlen]``; the slots past a
    sequence's end hold -inf (a row that sees no key)."""
    sequence, position, longest = _token_index(cu_seqlens.to(lse.device), "unflatten_varlen_lse")
    rows = lse.squeeze(-1) if lse.dim() == 3 and lse.shape[-1] == 1 else lse
    if rows.dim() != 2 or rows.shape[0] != sequence.numel():
        raise ValueError(f"lse: expected [total={sequence.numel()}, heads] or [total, heads, 1], got "
                         f"{tuple(lse.shape)}")
    if max_seqlen < longest:
        raise ValueError(f"max_seqlen: expected at least the longest sequence's {longest} tokens, got {max_seqlen}")
    out = torch.full((cu_seqlens.numel() - 1, rows.shape[1], max_seqlen), float("-inf"), dtype=lse.dtype,
                     device=lse.device)
    out[sequence, :, position] = rows
    return out
