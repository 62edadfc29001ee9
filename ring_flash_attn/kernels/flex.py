"""PyTorch's FlexAttention as a kernel backend for band masks and soft-capping.

* The mask is a block mask built once per (block shape, band) from the band
  ``lo <= (q_offset + i) - (k_offset + j) <= hi`` (:mod:`.mask`). The band's
  bounds are tensors the mask reads, so one compiled kernel serves every band
  of a block shape (with Python ints, each band would be a recompilation). A
  block the band leaves fully visible runs with no mask at all.
* Soft-capping is a ``score_mod``: ``softcap * tanh(score / softcap)``, where
  ``score`` is already multiplied by ``scale``, as in the reference; the cap is
  a tensor too, for the same reason.
* GQA/MQA through ``enable_gqa=True``: K/V heads are never repeated.
* ``forward`` asks for the LSE (``return_aux=AuxRequest(lse=True)``, or the
  older ``return_lse=True``); PyTorch converts it to the natural log. A row
  that sees no key gets ``out = 0`` and ``lse = -inf``.
* ``backward`` gets the ring's GLOBAL ``out``/``lse``, but FlexAttention's own
  backward differentiates the forward it ran. So the block's forward is
  recomputed under autograd and given the gradients the global result sends
  back to it. With ``w = exp(lse_b - lse)`` (the block's weight in the merged
  softmax), ``out = sum_b w_b out_b`` and ``lse = logsumexp_b lse_b``:

      dL/d out_b = w * dout
      dL/d lse_b = w * (rowsum(dout * out_b) - rowsum(dout * out))

  FlexAttention folds the LSE gradient into its row term,
  ``delta = rowsum(out_b * dL/d out_b) - dL/d lse_b = w * rowsum(dout * out)``,
  so its score gradient is ``exp(s - lse) * (dout . v - rowsum(dout * out))``
  (times the soft-cap's derivative): the flash backward with the global
  statistics. The LSE gradient below is
  computed from the rounded ``dL/d out_b`` that FlexAttention sees, so the two
  ``rowsum(dout * out_b)`` terms cancel exactly rather than to within rounding.
  Cost: one extra block forward per block backward.

On CUDA and XPU ``flex_attention`` is compiled (``dynamic=False``: static shapes
give the fastest kernels; dynamo keeps one entry per block shape, dtype, mask
kind (none / band, soft-capped or not) and grad mode, so packed batches whose
blocks take many distinct lengths compile many times). On the CPU, PyTorch runs FlexAttention unfused (the
whole score matrix in memory) and refuses its backward (torch 2.13), so this
backend declines the CPU; the tests lift both limits to check it there.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
from torch.nn.attention import flex_attention as _flex_module

from .base import Features, KernelBackend, band_of, lse_dtype, unit_stride_rows

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Stands in for an unbounded side of the band: |d| never comes near it (d is bounded by the token count).
_UNBOUNDED = 1 << 30
# Dynamo's default of 8 compiled entries per function is too few for a ring run: every block shape, dtype,
# mask kind and grad mode (the backward's recompute) is its own entry, and past the limit dynamo falls
# back to the unfused eager FlexAttention. The limit is raised only around our own calls.
_RECOMPILE_LIMIT = 64
# return_aux replaces the deprecated return_lse in newer torch; use it where it exists.
_HAS_AUX = hasattr(_flex_module, "AuxRequest") and "return_aux" in inspect.signature(
    _flex_module.flex_attention).parameters


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    return torch.compile(_flex_module.flex_attention, dynamic=False)


@functools.lru_cache(maxsize=None)
def _recompile_limit_name() -> str:
    # Looked up on first use, not at import: importing torch._dynamo takes seconds.
    import torch._dynamo

    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def _flex_with_lse(q, k, v, block_mask, score_mod, scale):
    """FlexAttention on ``[B, H, S, D]`` tensors: ``(out, lse)``, lse natural log, float32."""
    kwargs = dict(block_mask=block_mask, score_mod=score_mod, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if _HAS_AUX:
        kwargs["return_aux"] = _flex_module.AuxRequest(lse=True)
    else:
        kwargs["return_lse"] = True
    # Eager FlexAttention (the CPU) is traced by dynamo too, so the limit applies to both.
    attend = _flex_module.flex_attention if q.device.type == "cpu" else _compiled_flex_attention()
    with torch._dynamo.config.patch(**{_recompile_limit_name(): _RECOMPILE_LIMIT}):
        result = attend(q, k, v, **kwargs)
    out, aux = result
    return out, (aux.lse if _HAS_AUX else aux)


def _band_mask_mod(offset: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Visible iff ``lo <= i - j + offset <= hi``; the bounds are 0-d int32 tensors (see the module docstring)."""
    def band_mask(b, h, i, j):
        d = i - j + offset
        return (d >= lo) & (d <= hi)
    return band_mask


@functools.lru_cache(maxsize=128)
def _block_mask(seqlen_q: int, seqlen_k: int, offset: int, lo: int, hi: int, device: torch.device):
    """The block mask of one band on one block shape; cached: building one evaluates the mask on every pair."""
    bounds = (torch.tensor(x, dtype=torch.int32, device=device) for x in (offset, lo, hi))
    return _flex_module.create_block_mask(_band_mask_mod(*bounds), None, None, seqlen_q, seqlen_k, device=device)


@functools.lru_cache(maxsize=None)
def _document_mask_mod(segments: torch.Tensor, q_positions: torch.Tensor, k_positions: torch.Tensor,
                       offset: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Visible iff the same sequence and ``lo <= q_pos - k_pos + offset <= hi`` (ring/documents.py)."""
    def document_mask(b, h, i, j):
        d = q_positions[i] - k_positions[j] + offset
        return (segments[i] == segments[j]) & (d >= lo) & (d <= hi)
    return document_mask


def _document_block_mask(call, device: torch.device):
    """The block mask of a :class:`~ring_flash_attn.ring.documents.DocumentCall`, made once per device."""
    def make():
        band = call.band
        bounds = [torch.tensor(x, dtype=torch.int32, device=device) for x in (
            band.offset, -_UNBOUNDED if band.lo is None else band.lo, _UNBOUNDED if band.hi is None else band.hi)]
        tensors = [t.to(device=device, dtype=torch.int32) for t in (call.segments, call.q_positions, call.k_positions)]
        return _flex_module.create_block_mask(_document_mask_mod(*tensors, *bounds), None, None,
                                              call.q_positions.numel(), call.k_positions.numel(), device=device)
    return call.cached(("flex block mask", device), make)


@functools.lru_cache(maxsize=None)
def _softcap_score_mod(softcap: float, device: torch.device):
    """``softcap * tanh(score / softcap)``; the cap is a tensor the score_mod reads, as the band's bounds are:
    as a Python float, dynamo makes a changed value a symbolic float, which FlexAttention's tracing rejects."""
    cap = torch.tensor(softcap, dtype=torch.float32, device=device)

    def soft_cap(score, b, h, i, j):
        return cap * torch.tanh(score / cap)
    return soft_cap


def _bhsd(x):
    return x.transpose(1, 2)


class FlexBackend(KernelBackend):
    """Band masks and soft-capping through PyTorch's FlexAttention (compiled on GPUs)."""

    name = "flex"

    def unsupported_reason(self, f: Features):
        if f.alibi:
            return "ALiBi is not wired to FlexAttention here"
        if f.dtype not in _DTYPES:
            return f"FlexAttention is used here for float16, bfloat16 or float32, got {f.dtype}"
        if not 16 <= f.head_dim <= 256:
            # Below 16 the compiled kernels refuse (tl.dot); above 256 nobody has tried them.
            return f"FlexAttention's compiled kernels take 16 <= head_dim <= 256, got {f.head_dim}"
        if f.device_type == "cpu":
            return ("FlexAttention on the CPU runs unfused (the whole score matrix in memory) and has no "
                    f"backward (torch {torch.__version__}); use sdpa or reference")
        if f.device_type not in ("cuda", "xpu"):
            return f"no compiled FlexAttention for device type {f.device_type!r}"
        return None

    # A packed batch's ring step in one call (ring/documents.py): the engine asks for it where this is True.
    serves_documents = True

    def _attend(self, q, k, v, band, scale, softcap, block_mask=None):
        """``(out [B, Sq, H, D], lse [B, H, Sq] float32)`` of one block; the band must not be empty.
        ``block_mask``: a document mask instead of the band's."""
        sq, sk = q.shape[1], k.shape[1]
        if block_mask is None and not band.is_full(sq, sk):
            block_mask = _block_mask(sq, sk, band.offset, -_UNBOUNDED if band.lo is None else band.lo,
                                     _UNBOUNDED if band.hi is None else band.hi, q.device)
        score_mod = _softcap_score_mod(float(softcap), q.device) if softcap else None
        # Its compiled kernels are unmeasured with a strided head_dim: rows go in at unit stride, as everywhere.
        q, k, v = (_bhsd(unit_stride_rows(t)) for t in (q, k, v))
        out, lse = _flex_with_lse(q, k, v, block_mask, score_mod, scale)
        return _bhsd(out), lse

    def forward_documents(self, q, k, v, call, *, scale, softcap=0.0):
        """``(out, lse)`` of one :class:`~ring_flash_attn.ring.documents.DocumentCall`; rows that see no key
        get ``out = 0``, ``lse = -inf``."""
        out, lse = self._attend(q, k, v, None, scale, softcap, _document_block_mask(call, q.device))
        return out, lse.to(lse_dtype(q.dtype))

    def backward_documents(self, dout, q, k, v, out, lse, call, *, scale, softcap=0.0):
        """Gradients of one :class:`~ring_flash_attn.ring.documents.DocumentCall` from the global out/LSE."""
        return self._recomputed_gradients(dout, q, k, v, out, lse, None, scale, softcap,
                                          _document_block_mask(call, q.device))

    def forward(self, q, k, v, *, scale, causal=False, window=(-1, -1), q_offset=0, k_offset=0, softcap=0.0):
        band = band_of(causal, window, q_offset, k_offset)
        b, sq, h, _ = q.shape
        if band.is_empty(sq, k.shape[1]):
            return torch.zeros_like(q), torch.full((b, h, sq), -math.inf, dtype=lse_dtype(q.dtype), device=q.device)
        out, lse = self._attend(q, k, v, band, scale, softcap)
        return out, lse.to(lse_dtype(q.dtype))

    def backward(self, dout, q, k, v, out, lse, *, scale, causal=False, window=(-1, -1), q_offset=0, k_offset=0,
                 softcap=0.0):
        band = band_of(causal, window, q_offset, k_offset)
        if band.is_empty(q.shape[1], k.shape[1]):
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        return self._recomputed_gradients(dout, q, k, v, out, lse, band, scale, softcap)

    def _recomputed_gradients(self, dout, q, k, v, out, lse, band, scale, softcap, block_mask=None):
        """The block's forward recomputed under autograd, given the global result's gradients (docstring)."""
        q_in, k_in, v_in = (x.detach().requires_grad_() for x in (q, k, v))
        with torch.enable_grad():
            out_b, lse_b = self._attend(q_in, k_in, v_in, band, scale, softcap, block_mask)
        gradients = _block_output_gradients if q.device.type == "cpu" else _compiled_block_output_gradients()
        with torch._dynamo.config.patch(**{_recompile_limit_name(): _RECOMPILE_LIMIT}):
            grad_out_b, grad_lse_b = gradients(dout, out, lse, out_b.detach(), lse_b.detach())
        dq, dk, dv = torch.autograd.grad((out_b, lse_b), (q_in, k_in, v_in), (grad_out_b, grad_lse_b))
        return dq, dk, dv


def _block_output_gradients(dout, out, lse, out_b, lse_b):
    """``(dL/d out_b, dL/d lse_b)`` of one block from the global ``dout``, ``out``, ``lse`` (module docstring).

    Flash layout: dout/out/out_b ``[B, Sq, H, D]``, lse/lse_b ``[B, H, Sq]``.
    """
    lse = lse.float()
    # The block's weight in the merged softmax; a row that saw no key anywhere (lse = -inf) has
    # lse_b = -inf too, and any finite stand-in for lse gives it weight 0 instead of NaN.
    weight = torch.exp(lse_b - lse.masked_fill(lse == -math.inf, 0.0))
    dout32 = dout.float()
    grad_out_b = (dout32 * weight.transpose(1, 2).unsqueeze(-1)).to(out_b.dtype)
    rowsum_block = (grad_out_b.float() * out_b.float()).sum(-1).transpose(1, 2)
    rowsum_global = (dout32 * out.float()).sum(-1).transpose(1, 2)
    return grad_out_b, rowsum_block - weight * rowsum_global


@functools.lru_cache(maxsize=None)
def _compiled_block_output_gradients():
    # Six elementwise passes and two row sums over [B, Sq, H, D] in eager mode; one fused kernel compiled.
    return torch.compile(_block_output_gradients, dynamic=False)
