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

from .comm.ring import RingComm
from .kernels import Features, select_backend
from .kernels.mask import Band, check_window
from .ring.engine import RingAttentionFunction, RingPlan
from .ring.layouts import get_layout
from .ring.planner import needs_band_mask
from .validation import check_qkv, check_softcap, check_unsupported


def ring_attention(q, k, v, *, variant: str = "ring", causal: bool = False, softmax_scale: Optional[float] = None,
                   window_size=(-1, -1), softcap: float = 0.0, group: Optional[dist.ProcessGroup] = None,
                   backend: Optional[str] = None, comm=None):
    """Ring attention of this rank's ``q`` over every rank's ``k``/``v``; returns ``(out, lse)``.

    All validation happens here, before any communication. ``comm`` replaces the
    process-group communicator (e.g. with a loopback one for single-device runs).
    """
    check_qkv(q, k, v)
    window = check_window(window_size)
    softcap = check_softcap(softcap)
    layout = get_layout(variant)
    if comm is None:
        comm = RingComm(group)
    layout.check(q.shape[1], comm.world_size, causal)
    band = Band.from_kernel_args(causal, window)
    features = Features(q.device.type, q.dtype, q.shape[-1],
                        band=needs_band_mask(layout, comm.rank, comm.world_size, q.shape[1], band),
                        softcap=softcap > 0)
    kernel = select_backend(features, backend)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    plan = RingPlan(layout=layout, band=band, scale=scale, softcap=softcap, backend=kernel, comm=comm)
    return RingAttentionFunction.apply(q, k, v, plan)


def _compat_call(q, k, v, variant, dropout_p, softmax_scale, causal, window_size, alibi_slopes, return_attn_probs,
                 group, softcap, backend):
    check_unsupported(dropout_p, alibi_slopes)
    out, lse = ring_attention(q, k, v, variant=variant, causal=causal, softmax_scale=softmax_scale,
                              window_size=window_size, softcap=softcap, group=group, backend=backend)
    return (out, lse, None) if return_attn_probs else out


def _unpack(packed: torch.Tensor, name: str, parts: int):
    if not isinstance(packed, torch.Tensor) or packed.dim() != 5 or packed.shape[2] != parts:
        shape = tuple(packed.shape) if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"{name}: expected [batch, seqlen, {parts}, heads, head_dim], got {shape}")
    return packed.unbind(dim=2)


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

    prefix = "ring_flash_attn" if variant == "ring" else f"{variant}_ring_flash_attn" if variant == "zigzag" \
        else f"{variant}_flash_attn"
    for fn, suffix in ((func, "func"), (kvpacked_func, "kvpacked_func"), (qkvpacked_func, "qkvpacked_func")):
        fn.__name__ = fn.__qualname__ = f"{prefix}_{suffix}"
        fn.__doc__ = f"{variant!r} ring attention ({suffix}); see :mod:`ring_flash_attn.functional`."
    return func, kvpacked_func, qkvpacked_func


ring_flash_attn_func, ring_flash_attn_kvpacked_func, ring_flash_attn_qkvpacked_func = _make_api("ring")
(zigzag_ring_flash_attn_func, zigzag_ring_flash_attn_kvpacked_func,
 zigzag_ring_flash_attn_qkvpacked_func) = _make_api("zigzag")
