"""The local-attention contract every kernel backend implements.

Layouts (the flash-attn ones): q ``[batch, seqlen_q, heads, head_dim]``,
k/v ``[batch, seqlen_k, heads_k, head_dim]`` with ``heads % heads_k == 0``
(GQA/MQA: K/V heads are never repeated by the caller), LSE
``[batch, heads, seqlen_q]`` in float32 (float64 for float64 inputs), natural log.

``forward(q, k, v, *, scale, causal, window, q_offset, k_offset, softcap) -> (out, lse)``
    ``out`` has q's dtype. A row that sees no key gets ``out = 0`` and
    ``lse = -inf``.
``backward(dout, q, k, v, out, lse, *, scale, causal, window, q_offset, k_offset, softcap) -> (dq, dk, dv)``
    ``out`` and ``lse`` are the GLOBAL ones (after the whole ring), never the
    block's: with them, the block's gradients are exact partial sums.
    Gradients have their input's dtype.

Mask arguments are described in :mod:`ring_flash_attn.kernels.mask`.

ALiBi, only where a backend declares it (``Features.alibi``) and passed only
when on: ``alibi_slopes`` (float32 ``[heads]`` or ``[batch, heads]``),
``alibi_delta`` and ``alibi_stride`` add ``-slope * |alibi_delta + alibi_stride * (i - j)|``
to the score of query row i and key row j (the true token distance, as in flash-attn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..merge import merge_into
from .mask import Band


@dataclass(frozen=True)
class Features:
    """What one attention call needs from a backend."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    band: bool = False  # a mask other than none / top-left causal on equal lengths
    softcap: bool = False
    alibi: bool = False


class KernelBackend:
    """Base class: a named pair of forward/backward functions with a capability check."""

    name: str = ""
    # True: ``forward_documents`` / ``backward_documents`` serve a packed batch's whole ring step in one call
    # under a document mask (ring/documents.py), and the engine uses them for packed batches.
    serves_documents: bool = False

    def unsupported_reason(self, features: Features) -> Optional[str]:
        """None if the backend can serve ``features``, else why not (for error messages)."""
        raise NotImplementedError

    def forward(self, q, k, v, *, scale: float, causal: bool = False, window=(-1, -1),
                q_offset: int = 0, k_offset: int = 0, softcap: float = 0.0):
        raise NotImplementedError

    def backward(self, dout, q, k, v, out, lse, *, scale: float, causal: bool = False, window=(-1, -1),
                 q_offset: int = 0, k_offset: int = 0, softcap: float = 0.0):
        raise NotImplementedError

    def forward_accumulate(self, q, k, v, out_acc, lse_acc, *, scale: float, causal: bool = False,
                           window=(-1, -1), q_offset: int = 0, k_offset: int = 0, softcap: float = 0.0,
                           **alibi) -> None:
        """Fold this block into the running ``(out_acc, lse_acc)`` (float32 ``[B,S,H,D]`` / ``[B,H,S]``), in place.

        The ring engine calls only this. The default runs :meth:`forward` and
        merges; a ring-aware kernel overrides it to fold the block in without a
        separate merge pass.
        """
        out, lse = self.forward(q, k, v, scale=scale, causal=causal, window=window, q_offset=q_offset,
                                k_offset=k_offset, softcap=softcap, **alibi)
        merge_into(out_acc, lse_acc, out, lse)

    # -- many blocks of one ring step in one call (ring/batching.py's VarlenBatch) ----------------------
    def serves_varlen(self, features: Features) -> bool:
        """Whether :meth:`forward_varlen` / :meth:`backward_varlen` run a :class:`~ring_flash_attn.ring.batching.
        VarlenBatch` as one launch for calls of ``features`` (then the engine makes them for packed batches)."""
        return False

    def forward_varlen(self, q, k, v, call, *, scale: float, softcap: float = 0.0):
        """The blocks of ``call`` (a VarlenBatch: blocks of any lengths, all unmasked or all causal squares),
        packed along the token dim: q ``[Tq, H, D]`` holds block after block, k/v ``[Tk, Hk, D]`` likewise.
        Returns ``out [Tq, H, D]`` and ``lse [H, Tq]``. This default makes one :meth:`forward` per block (a
        reference for tests); a backend with a variable-length kernel overrides it."""
        outs, lses = [], []
        for (q0, q1), (k0, k1) in call.spans():
            out, lse = self.forward(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], scale=scale, causal=call.causal,
                                    softcap=softcap)
            outs.append(out[0])
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, dim=1)

    def backward_varlen(self, dout, q, k, v, out, lse, call, *, scale: float, softcap: float = 0.0):
        """The gradients of :meth:`forward_varlen`'s blocks (``out``/``lse`` the global ones, packed as there):
        ``(dq [Tq, H, D], dk [Tk, Hk, D], dv)``, packed as the inputs."""
        grads = []
        for (q0, q1), (k0, k1) in call.spans():
            grads.append(self.backward(dout[None, q0:q1], q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
                                       out[None, q0:q1], lse[None, :, q0:q1], scale=scale, causal=call.causal,
                                       softcap=softcap))
        return tuple(torch.cat([g[i][0] for g in grads]) for i in range(3))

    def __repr__(self) -> str:
        return f"<kernel backend {self.name!r}>"


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def band_of(causal: bool, window, q_offset: int, k_offset: int) -> Band:
    return Band.from_kernel_args(causal, tuple(window), q_offset, k_offset)


def alibi_bias(slopes: torch.Tensor, delta: int, stride: int, seqlen_q: int, seqlen_k: int, dtype) -> torch.Tensor:
    """``-slope * |delta + stride * (i - j)|`` as ``[batch or 1, heads, seqlen_q, seqlen_k]``."""
    i = torch.arange(seqlen_q, device=slopes.device).view(-1, 1)
    j = torch.arange(seqlen_k, device=slopes.device).view(1, -1)
    distance = (delta + stride * (i - j)).abs().to(dtype)
    return -slopes.to(dtype).view(-1, slopes.shape[-1], 1, 1) * distance


def unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last dim (head_dim; an LSE's sequence) has unit stride, else a contiguous copy.

    The fused kernels read each row at unit stride and take every other dim through its stride (sliced,
    transposed, expanded and offset tensors are fine there): given ``x[..., ::2]`` PyTorch's CPU flash op
    returns wrong values without an error, so every backend passes its tensors through this first. The
    common layouts (contiguous, a slice of a packed qkv) are not copied.
    """
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, S, Hk, D] -> [B, S, Hk * groups, D], each K/V head repeated for its query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def sum_kv_groups(dx: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of :func:`repeat_kv` for gradients: sum each K/V head's query-head group."""
    if groups == 1:
        return dx
    b, s, h, d = dx.shape
    return dx.view(b, s, h // groups, groups, d).sum(dim=3)


BackendFactory = Callable[[], KernelBackend]
