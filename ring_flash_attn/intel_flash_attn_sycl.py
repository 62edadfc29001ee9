"""The seed project's SYCL entry points, backed by the kernels of ``csrc/sycl``.

Shapes (flash-attn layout): q ``[batch, seqlen_q, heads, head_dim]``, k/v
``[batch, seqlen_k, heads_k, head_dim]`` with ``heads % heads_k == 0``; lse
``[batch, heads, seqlen_q]`` float32, natural log. float32, float16 and bfloat16;
head_dim 64 or 128. The forward is differentiable (autograd runs the SYCL backward).
See docs/sycl.md for building the extension.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .kernels import sycl as _sycl
from .kernels.mask import check_window


def is_sycl_available() -> bool:
    """True when the SYCL extension is built, loaded and finds a device to run on."""
    return _sycl.unavailable_reason() is None


def _require_extension() -> None:
    reason = _sycl.unavailable_reason()
    if reason:
        raise RuntimeError(reason)


def _scale(q: torch.Tensor, softmax_scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


def intel_flash_attn_forward_sycl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                                  softmax_scale: Optional[float] = None, *, window_size=(-1, -1),
                                  softcap: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over k/v; returns ``(out [B, Sq, H, D], lse [B, H, Sq])``.

    ``causal`` hides key j from query i when j > i (top-left aligned, as PyTorch's
    ``is_causal``; flash-attn aligns bottom-right, which differs when seqlen_q != seqlen_k:
    use the ``sycl`` kernel backend's ``q_offset``/``k_offset`` for other alignments).
    ``window_size=(left, right)`` limits each query to keys within left/right
    positions (-1 = unbounded); ``softcap > 0`` caps scores at +-softcap with tanh.
    """
    _require_extension()
    left, right = check_window(window_size)
    return torch.ops.ring_flash_attn_sycl.fwd(q, k, v, _scale(q, softmax_scale), bool(causal), left, right, 0, 0,
                                              float(softcap))


def intel_flash_attn_backward_sycl(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   out: torch.Tensor, lse: torch.Tensor, causal: bool = False,
                                   softmax_scale: Optional[float] = None, *, window_size=(-1, -1),
                                   softcap: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`intel_flash_attn_forward_sycl` given ``dout`` and its ``out``/``lse``."""
    _require_extension()
    left, right = check_window(window_size)
    return torch.ops.ring_flash_attn_sycl.bwd(dout, q, k, v, out, lse.float(), None, _scale(q, softmax_scale),
                                              bool(causal), left, right, 0, 0, float(softcap))


__all__ = ["is_sycl_available", "intel_flash_attn_forward_sycl", "intel_flash_attn_backward_sycl"]
