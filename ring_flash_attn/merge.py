"""Combining partial attention results by their log-sum-exp.

If a query row saw key sets A and B separately, with outputs ``o_a``, ``o_b``
(each softmax-normalised over its own keys) and log-sum-exps ``l_a``, ``l_b``,
then over A and B together ``l = logaddexp(l_a, l_b)`` and
``o = exp(l_a - l) * o_a + exp(l_b - l) * o_b``.

Accumulators are float32 (float64 for float64 inputs). A row that has seen no
key yet has ``l = -inf`` and ``o = 0``; merging two such rows must give -inf
and 0 again, not NaN (``exp(-inf - -inf)``), hence the guard below.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _fused_merge():
    """The one-kernel Triton merge, or None where Triton is not installed."""
    try:
        from .kernels.triton_merge import triton_merge_into
    except ImportError:
        return None
    return triton_merge_into


def merge_into(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_block: torch.Tensor, lse_block: torch.Tensor) -> None:
    """Fold one block's result into the running one, in place.

    out_acc ``[B, S, H, D]`` float32/64, lse_acc ``[B, H, S]`` of the same dtype;
    out_block/lse_block the block's result for the same rows (any float dtype).
    Both accumulators may be views (slices of larger buffers).

    On a GPU with Triton installed this is one fused kernel (a single pass over
    the accumulator); elsewhere, and for float64, the eager form below.
    """
    if (out_acc.device.type != "cpu" and out_acc.dtype == torch.float32 and out_acc.stride(-1) == 1
            and lse_acc.stride(-1) == 1 and _fused_merge() is not None):
        _fused_merge()(out_acc, lse_acc, out_block, lse_block)
        return
    merge_into_eager(out_acc, lse_acc, out_block, lse_block)


def merge_into_eager(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_block: torch.Tensor,
                     lse_block: torch.Tensor) -> None:
    """:func:`merge_into` in plain PyTorch ops: any device, any float dtype."""
    lse_block = lse_block.to(lse_acc.dtype)
    lse_new = torch.logaddexp(lse_acc, lse_block)
    # exp(l - lse_new) with lse_new = -inf would be NaN; any finite stand-in gives weight 0 there.
    safe = lse_new.masked_fill(lse_new == float("-inf"), 0.0)
    w_acc = torch.exp(lse_acc - safe).transpose(1, 2).unsqueeze(-1)
    w_block = torch.exp(lse_block - safe).transpose(1, 2).unsqueeze(-1)
    out_acc.mul_(w_acc).add_(w_block * out_block.to(out_acc.dtype))
    lse_acc.copy_(lse_new)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the engines accumulate (out, LSE, gradients) in for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def new_accumulators(q: torch.Tensor) -> tuple:
    """Zero output and -inf LSE accumulators for queries ``q`` [B, S, H, D]."""
    acc_dtype = accumulator_dtype(q.dtype)
    b, s, h, d = q.shape
    out = torch.zeros(b, s, h, d, dtype=acc_dtype, device=q.device)
    lse = torch.full((b, h, s), float("-inf"), dtype=acc_dtype, device=q.device)
    return out, lse
