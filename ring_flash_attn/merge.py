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

import torch


def merge_into(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_block: torch.Tensor, lse_block: torch.Tensor) -> None:
    """Fold one block's result into the running one, in place.

    out_acc ``[B, S, H, D]`` float32/64, lse_acc ``[B, H, S]`` of the same dtype;
    out_block/lse_block the block's result for the same rows (any float dtype).
    Both accumulators may be views (slices of larger buffers).
    """
    lse_block = lse_block.to(lse_acc.dtype)
    lse_new = torch.logaddexp(lse_acc, lse_block)
    # exp(l - lse_new) with lse_new = -inf would be NaN; any finite stand-in gives weight 0 there.
    safe = lse_new.masked_fill(lse_new == float("-inf"), 0.0)
    w_acc = torch.exp(lse_acc - safe).transpose(1, 2).unsqueeze(-1)
    w_block = torch.exp(lse_block - safe).transpose(1, 2).unsqueeze(-1)
    out_acc.mul_(w_acc).add_(w_block * out_block.to(out_acc.dtype))
    lse_acc.copy_(lse_new)


def new_accumulators(q: torch.Tensor) -> tuple:
    """Zero output and -inf LSE accumulators for queries ``q`` [B, S, H, D]."""
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, s, h, d = q.shape
    out = torch.zeros(b, s, h, d, dtype=acc_dtype, device=q.device)
    lse = torch.full((b, h, s), float("-inf"), dtype=acc_dtype, device=q.device)
    return out, lse
