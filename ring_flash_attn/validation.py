"""Argument checks that run before any communication.

Every check depends only on values every rank knows (shapes, dtypes,
arguments, group size), so bad input raises the same error on every rank and
no rank is left waiting in a collective. Messages name the argument, what was
expected and what was given.
"""

from __future__ import annotations

import math
import operator
import os
from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dimensions [batch, seqlen, heads, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.device.type == "meta":
            raise ValueError(f"{name}: expected a tensor holding its values, got one on the meta device, which "
                             "holds none")
        if _under_functorch(t):
            raise NotImplementedError(
                f"{name}: ring attention cannot run under torch.func transforms (vmap, grad, jacrev, ...): each call "
                "exchanges blocks between ranks and brings its own backward; call it outside the transform and "
                "take gradients with torch.autograd (loss.backward())")
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if (q.shape[0], q.shape[1], q.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
        raise ValueError(f"k: expected [batch, seqlen, heads_k, head_dim] = [{q.shape[0]}, {q.shape[1]}, *, {q.shape[3]}] "
                         f"to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if q.shape[3] == 0:
        raise ValueError(f"q: expected head_dim >= 1, got shape {tuple(q.shape)}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"k: the number of K/V heads must divide the number of query heads ({q.shape[2]}), "
                         f"got {k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"k, v: expected q's dtype {q.dtype}, got k {k.dtype} and v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"k, v: expected q's device {q.device}, got k on {k.device} and v on {v.device}")


def _under_functorch(t: torch.Tensor) -> bool:
    """Whether ``t`` is a torch.func transform's wrapper (vmap's batched tensor, grad's tracking tensor)."""
    functorch = getattr(torch._C, "_functorch", None)
    return bool(functorch is not None and functorch.is_functorch_wrapped_tensor(t))


def check_packed_qkv(q, k, v) -> None:
    """Packed sequences: q/k/v ``[total_tokens, heads, head_dim]``, otherwise as :func:`check_qkv`."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: with cu_seqlens expected [total_tokens, heads, head_dim], got {shape}")
    check_qkv(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))


def check_unsupported(dropout_p: float) -> None:
    """Arguments of the flash-attn API this library does not implement: refuse them rather than ignore them."""
    if dropout_p:
        raise NotImplementedError(f"dropout_p: attention dropout is not supported, got dropout_p={dropout_p}; pass 0.0")


def check_alibi_slopes(alibi_slopes, q: torch.Tensor, heads_dim: int = 2):
    """flash-attn's ALiBi slopes: float32 ``[heads]`` or ``[batch, heads]`` on q's device (None: off)."""
    if alibi_slopes is None:
        return None
    heads, batch = q.shape[heads_dim], q.shape[0]
    if not isinstance(alibi_slopes, torch.Tensor) or tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        shape = tuple(alibi_slopes.shape) if isinstance(alibi_slopes, torch.Tensor) else type(alibi_slopes).__name__
        raise ValueError(f"alibi_slopes: expected shape ({heads},) or ({batch}, {heads}), got {shape}")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes: expected dtype torch.float32, got {alibi_slopes.dtype}")
    if alibi_slopes.device != q.device:
        raise ValueError(f"alibi_slopes: expected q's device {q.device}, got {alibi_slopes.device}")
    if alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("alibi_slopes: their gradient is not computed (as in flash-attn), and a slope "
                                  "that requires one would silently get none; pass alibi_slopes.detach()")
    return alibi_slopes


def check_softmax_scale(softmax_scale, head_dim: int) -> float:
    """The scale of QK^T: ``1 / sqrt(head_dim)`` for None, else a finite number > 0.

    0 and negative scales are refused: PyTorch's fused CPU op returns NaN for them (0 with a causal mask, any
    negative scale: measured, torch 2.13) where the answer is uniform (0) or reversed attention, and no model
    means either; NaN and inf give NaN or a silently finite result."""
    if softmax_scale is None:
        return head_dim ** -0.5
    expected = "softmax_scale: expected a finite number > 0, or None for 1 / sqrt(head_dim)"
    if isinstance(softmax_scale, (bool, str, bytes)):
        raise TypeError(f"{expected}, got {softmax_scale!r} ({type(softmax_scale).__name__})")
    try:
        scale = float(softmax_scale)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{expected}, got {type(softmax_scale).__name__}") from None
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{expected}, got {scale}")
    return scale


def check_flag(value, name: str) -> bool:
    """A bool argument (``causal``): True/False or 0/1. A string would be read by its truthiness ("False" is
    true), so it is refused."""
    numpy_bool = type(value).__name__ in ("bool", "bool_")
    if isinstance(value, bool) or numpy_bool or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name}: expected a bool, got {value!r} ({type(value).__name__})")


def check_softcap(softcap: float) -> float:
    if isinstance(softcap, (str, bytes, bool)):
        raise TypeError(f"softcap: expected a finite number >= 0 (0 = off), got {softcap!r} "
                        f"({type(softcap).__name__})")
    softcap = float(softcap or 0.0)
    if not math.isfinite(softcap) or softcap < 0:  # inf would cap nothing and give NaN: tanh(s/inf) * inf
        raise ValueError(f"softcap: expected a finite value >= 0 (0 = off), got {softcap}")
    return softcap


def check_cu_seqlens(cu_seqlens, total_tokens: Optional[int], name: str = "cu_seqlens") -> tuple:
    """Validate flash-attn style cumulative sequence lengths; return the sequence lengths.

    As in flash-attn, int32 and int64 are taken, and repeated offsets (sequences of length 0, as padding
    makes) are allowed. The values are read to the host once, here. ``total_tokens=None`` takes any end.
    """
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        got = tuple(cu_seqlens.shape) if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"{name}: expected a 1-D int32 or int64 tensor, got {got}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected dtype torch.int32 or torch.int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device.type == "meta":
        raise ValueError(f"{name}: expected a tensor holding its values (on the CPU or q's device), got one on the "
                         "meta device, which holds none: the lengths are read from it")
    values = cu_seqlens.tolist()
    if len(values) < 2 or values[0] != 0:
        raise ValueError(f"{name}: expected to start at 0 and hold at least one sequence, got {values[:8]}")
    lengths = tuple(b - a for a, b in zip(values, values[1:]))
    if any(n < 0 for n in lengths):
        first = next(i for i, n in enumerate(lengths) if n < 0)
        raise ValueError(f"{name}: expected non-decreasing values, got {values[first]} then {values[first + 1]} "
                         f"at index {first}: {values[:16]}")
    if total_tokens is not None and values[-1] != total_tokens:
        raise ValueError(f"{name}: expected to end at the number of tokens {total_tokens}, got {values[-1]}")
    return lengths


def check_heads_k_stride(heads_k_stride, heads_k: int) -> int:
    if isinstance(heads_k_stride, bool) or not isinstance(heads_k_stride, int) or heads_k_stride < 1 \
            or heads_k % heads_k_stride:
        raise ValueError(f"heads_k_stride: expected a positive divisor of the K/V heads ({heads_k}), "
                         f"got {heads_k_stride!r}")
    return heads_k_stride


def _is_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


def check_rank(rank, world_size) -> None:
    """A rank and a world size given by hand (sharding helpers): ints with 0 <= rank < world_size."""
    if not _is_int(world_size) or world_size < 1:
        raise ValueError(f"world_size: expected an int >= 1 (the number of ranks the sequence is split over), "
                         f"got {world_size!r}")
    if not _is_int(rank) or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected an int with 0 <= rank < world_size ({world_size}), got {rank!r}; over a "
                         "subgroup pass the rank within it (torch.distributed.get_rank(group)), not the global rank")


def check_dim(dim, x, name: str = "x", min_dims: int = 1) -> int:
    """``dim`` as a non-negative index into ``x``'s dims (negative dims count from the end)."""
    if not isinstance(x, torch.Tensor) or x.dim() < min_dims:
        got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a tensor with at least {min_dims} dimension(s), got {got}")
    if not _is_int(dim) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim: expected an int indexing the {x.dim()} dimensions of {name} (the sequence "
                         f"dimension), got {dim!r}")
    return dim % x.dim()


def is_process_group(group) -> bool:
    """None (the default group), a ProcessGroup, or what ``new_group`` hands a rank outside the new group (an int
    sentinel: such a rank then hears that it is not a member): what ``group`` arguments take."""
    import torch.distributed as dist

    return group is None or (dist.is_available() and (isinstance(group, dist.ProcessGroup)
                                                      or (type(group) is int
                                                          and group == dist.GroupMember.NON_GROUP_MEMBER)))


def group_rank_and_size(group) -> tuple:
    """This rank's index in ``group`` and the group's size; a clear error if this rank is not a member."""
    import torch.distributed as dist

    if not is_process_group(group):
        raise TypeError(f"group: expected a torch.distributed.ProcessGroup or None (the default group), got "
                        f"{type(group).__name__}; make one with torch.distributed.new_group(ranks)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this rank is not a member of the given process group")
    return rank, dist.get_world_size(group)


def check_max_seqlen(max_seqlen, cu_seqlens) -> None:
    """``max_seqlen`` is not needed (lengths come from ``cu_seqlens``), but a wrong one signals a caller bug.

    Only a ``cu_seqlens`` that :func:`check_cu_seqlens` would take is looked at; anything else is left to it,
    so that the error names the argument at fault.
    """
    try:
        max_seqlen = operator.index(max_seqlen)
    except TypeError:
        raise TypeError(f"max_seqlen: expected an int, got {type(max_seqlen).__name__}") from None
    if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1 and cu_seqlens.numel() > 1 \
            and cu_seqlens.dtype in (torch.int32, torch.int64):
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if max_seqlen < longest:
            raise ValueError(f"max_seqlen: expected at least the longest local sequence ({longest}), got {max_seqlen}")


def check_packed_alibi_slopes(alibi_slopes, q: torch.Tensor):
    """ALiBi slopes for packed sequences (q ``[tokens, heads, dim]``): one slope per head, or None."""
    if alibi_slopes is not None and (not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dim() != 1):
        raise ValueError("alibi_slopes: with packed sequences expected one slope per head, shape (heads,)")
    return check_alibi_slopes(alibi_slopes, q, heads_dim=1)


BACKWARD_HEAD_CHUNKS_ENV = "RING_FLASH_ATTN_BACKWARD_HEAD_CHUNKS"


def backward_head_chunks(heads_k: int) -> int:
    """Into how many calls on groups of K/V heads the ring backward splits each block's call
    (``RING_FLASH_ATTN_BACKWARD_HEAD_CHUNKS``, default 1; see :class:`~ring_flash_attn.ring.engine.RingPlan`)."""
    raw = os.environ.get(BACKWARD_HEAD_CHUNKS_ENV, "")
    if raw == "":
        return 1
    try:
        chunks = int(raw)
    except ValueError:
        chunks = 0
    if chunks < 1 or heads_k % chunks:
        raise ValueError(f"{BACKWARD_HEAD_CHUNKS_ENV}: expected a positive integer dividing the K/V heads "
                         f"({heads_k}), got {raw!r}")
    return chunks
