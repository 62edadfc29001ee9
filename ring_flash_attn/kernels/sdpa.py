"""PyTorch's own fused attention ops that return the LSE.

* CPU: ``_scaled_dot_product_flash_attention_for_cpu`` (float32/64, bf16, fp16;
  any band mask through ``attn_mask``).
* CUDA: cuDNN (``_scaled_dot_product_cudnn_attention``) or FlashAttention-2
  (``_scaled_dot_product_flash_attention``) for bf16/fp16 without a band, GQA
  native; the memory-efficient op (K/V heads repeated) for float32, with an
  additive bias for bands. Half-precision bands are declined (see
  ``unsupported_reason``).
* XPU (torch >= 2.10): ``_scaled_dot_product_flash_attention`` (SYCL-TLA) for
  bf16/fp16 without a band; nothing else (the ``sycl`` backend covers the rest).

The ops take ``[B, H, S, D]``; we pass transposed views of the flash layout.

Layouts: every op here reads head_dim rows at unit stride and the other dims through their strides. Given a
strided head_dim the CPU ops return wrong values without an error (``q[..., ::2]``: measured, torch 2.13), and
FlashAttention-2 and the memory-efficient op refuse it, so q/k/v (and dout/out in the backward) go through
:func:`~.base.unit_stride_rows` (no copy for the usual layouts). FlashAttention-2's and cuDNN's backward
read the LSE as a contiguous ``[B, H, S]`` (the CPU op takes its strides): it is made contiguous there.
"""

from __future__ import annotations

import functools
import os

import torch

from .base import Features, KernelBackend, band_of, repeat_kv, sum_kv_groups, unit_stride_rows

aten = torch.ops.aten

_HALF = (torch.float16, torch.bfloat16)
_EFFICIENT_LSE_ALIGN = 32  # the efficient op pads its LSE rows to a multiple of 32


def _bhsd(x):
    return x.transpose(1, 2)


def _bias(band, sq, sk, device, dtype):
    """Additive mask (0 / -inf) for ops that take one."""
    visible = band.dense(sq, sk, device=device)
    return torch.zeros(sq, sk, device=device, dtype=dtype).masked_fill_(~visible, float("-inf"))


def _aligned_bias(band, sq, sk, batch, heads, device, dtype):
    """The additive mask as the CUDA memory-efficient op wants it: 4-D, its rows 16-element aligned.

    The op reads the bias through its strides and rejects rows whose stride is not
    a multiple of 16 elements; like PyTorch's own sdpa, we pad the allocation and
    pass a view.
    """
    padded = -(-sk // 16) * 16
    storage = torch.zeros(sq, padded, device=device, dtype=dtype)
    storage[:, :sk].masked_fill_(~band.dense(sq, sk, device=device), float("-inf"))
    return storage[:, :sk].expand(batch, heads, sq, sk)


@functools.lru_cache(maxsize=None)
def _cudnn_preferred(device_index: int) -> bool:
    # Cached: it runs on every ring step, and at 4k tokens per rank the host's time per step matters.
    return torch.backends.cudnn.is_available() and torch.cuda.get_device_capability(device_index)[0] >= 9


def _cudnn_serves(seqlen_q: int, seqlen_k: int) -> bool:
    """Whether the plain fused call goes to cuDNN. Not for 1 x 1 blocks (a packed sequence of one token per
    rank): cuDNN's backward refuses them ("s_q = s_kv = 1 is not supported", cuDNN 9.19, seen on H200), and
    FlashAttention-2 serves them."""
    return _cuda_fused_op() == "cudnn" and (seqlen_q, seqlen_k) != (1, 1)


def _cuda_fused_op() -> str:
    """cuDNN is the faster op on Hopper (shared/anchors: 604 vs 343 TFLOP/s fwd at 16k); allow an override."""
    choice = os.environ.get("RING_FLASH_ATTN_SDPA_OP", "")
    if choice in ("cudnn", "flash"):
        return choice
    return "cudnn" if _cudnn_preferred(torch.cuda.current_device()) else "flash"


class SdpaBackend(KernelBackend):
    name = "sdpa"

    def serves_varlen(self, f: Features) -> bool:
        # FlashAttention-2's variable-length entry point (sm80+, half precision, no mask but causal, GQA native)
        return (f.device_type == "cuda" and f.dtype in _HALF and not (f.band or f.softcap or f.alibi)
                and f.head_dim <= 256 and hasattr(aten, "_flash_attention_forward")
                and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8)

    def forward_varlen(self, q, k, v, call, *, scale, softcap=0.0):
        if softcap:
            raise NotImplementedError("softcap: the sdpa backend cannot apply logit soft-capping")
        q, k, v = (unit_stride_rows(t) for t in (q, k, v))
        cu_q, cu_k = call.offsets(q.device)
        out, lse = aten._flash_attention_forward(q, k, v, cu_q, cu_k, call.max_q, call.max_k, 0.0, call.causal,
                                                 False, scale=scale)[:2]
        if lse.shape != (q.shape[1], q.shape[0]):  # FA2's variable-length LSE is [heads, total_q]
            raise RuntimeError(f"flash varlen: expected an LSE of shape {(q.shape[1], q.shape[0])}, "
                               f"got {tuple(lse.shape)}")
        return out, lse

    def backward_varlen(self, dout, q, k, v, out, lse, call, *, scale, softcap=0.0):
        if softcap:
            raise NotImplementedError("softcap: the sdpa backend cannot apply logit soft-capping")
        dout, q, k, v, out = (unit_stride_rows(t) for t in (dout, q, k, v, out))
        cu_q, cu_k = call.offsets(q.device)
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        return aten._flash_attention_backward(dout, q, k, v, out, lse.float().contiguous(), cu_q, cu_k, call.max_q,
                                              call.max_k, 0.0, call.causal, seed, seed, scale=scale)[:3]

    def unsupported_reason(self, f: Features):
        if f.softcap:
            return "PyTorch's fused attention ops have no logit soft-capping"
        if f.alibi:
            return "ALiBi is not wired to PyTorch's fused attention ops here"
        if f.device_type == "cpu":
            if f.dtype not in (torch.float32, torch.float64, *_HALF):
                return f"the CPU flash op does not take {f.dtype}"
            return None
        if f.device_type == "cuda":
            if f.dtype not in (torch.float32, *_HALF):
                return f"the CUDA fused ops do not take {f.dtype}"
            if f.head_dim % 8 or f.head_dim > 256:
                return f"the CUDA fused ops need head_dim a multiple of 8 and <= 256, got {f.head_dim}"
            if f.band and f.dtype in _HALF:
                # Measured on H100, torch 2.11 (tests/gpu; the one-off probe benchmarks/efficient_bias_probe.py
                # of commit 7c0ab60): given an LSE it did not compute itself (the ring's global one), the
                # memory-efficient op's half-precision backward returns wrong dQ/dK (rel. err 0.13 to inf);
                # float32 is right.
                return ("a band mask in half precision needs the memory-efficient op, whose half-precision "
                        "backward is wrong given the ring's global LSE (torch 2.11); use the triton backend")
            return None
        if f.device_type == "xpu":
            if not hasattr(aten, "_scaled_dot_product_flash_attention"):
                return "this torch has no XPU flash attention op (needs torch >= 2.10)"
            if f.dtype not in _HALF:
                return f"the XPU flash op takes only float16/bfloat16, got {f.dtype}"
            if f.band:
                return "the XPU flash op has no mask other than top-left causal"
            return None
        return f"no fused attention op for device type {f.device_type!r}"

    # -- forward ---------------------------------------------------------------------------
    def forward(self, q, k, v, *, scale, causal=False, window=(-1, -1), q_offset=0, k_offset=0, softcap=0.0):
        if softcap:
            raise NotImplementedError("softcap: the sdpa backend cannot apply logit soft-capping")
        q, k, v = (unit_stride_rows(t) for t in (q, k, v))
        band = band_of(causal, window, q_offset, k_offset)
        sq, sk = q.shape[1], k.shape[1]
        if band.causal_shift(sq, sk) == 1 and sq > 1:
            # Row i sees keys j < i: causal attention of q[1:] over k[:-1]; row 0 sees nothing.
            out, lse = self.forward(q[:, 1:], k[:, :-1], v[:, :-1], scale=scale, causal=True)
            return (torch.cat([torch.zeros_like(q[:, :1]), out], dim=1),
                    torch.nn.functional.pad(lse, (1, 0), value=float("-inf")))
        is_causal = band.is_top_left_causal(sq, sk)
        plain = band.unbounded or is_causal
        if q.device.type == "cpu":
            mask = None if plain else _bias(band, sq, sk, q.device, q.dtype)
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
                _bhsd(q), _bhsd(k), _bhsd(v), 0.0, is_causal, attn_mask=mask, scale=scale)
            out = _bhsd(out)
        else:
            groups = q.shape[2] // k.shape[2]
            qh = _bhsd(q)
            if plain and q.dtype in _HALF and q.device.type == "cuda" and _cudnn_serves(sq, sk):
                # cuDNN and FA2 take fewer K/V heads as they are (GQA): no repeated copy of K/V.
                out, lse = aten._scaled_dot_product_cudnn_attention(
                    qh, _bhsd(k), _bhsd(v), None, True, 0.0, is_causal, False, scale=scale)[:2]
                lse = lse.reshape(lse.shape[0], lse.shape[1], sq)
            elif plain and q.dtype in _HALF:
                out, lse = aten._scaled_dot_product_flash_attention(
                    qh, _bhsd(k), _bhsd(v), 0.0, is_causal, False, scale=scale)[:2]
            else:
                kh, vh = _bhsd(repeat_kv(k, groups)), _bhsd(repeat_kv(v, groups))
                bias = None if plain else _aligned_bias(band, sq, sk, q.shape[0], q.shape[2], q.device, q.dtype)
                out, lse = aten._scaled_dot_product_efficient_attention(
                    qh, kh, vh, bias, True, 0.0, is_causal and bias is None, scale=scale)[:2]
                lse = lse[..., :sq]
            out = _bhsd(out)
        if not plain:
            # The fused ops leave rows that see no key at lse = 0 (CPU) or undefined; the contract says -inf.
            empty = band.empty_rows(sq, sk, device=q.device)
            if bool(empty.any()):
                lse = lse.masked_fill(empty, float("-inf"))
                out = out.masked_fill(empty.view(1, sq, 1, 1), 0.0)
        return out, lse.float() if q.dtype != torch.float64 else lse

    # -- backward --------------------------------------------------------------------------
    def backward(self, dout, q, k, v, out, lse, *, scale, causal=False, window=(-1, -1), q_offset=0, k_offset=0,
                 softcap=0.0):
        if softcap:
            raise NotImplementedError("softcap: the sdpa backend cannot apply logit soft-capping")
        dout, q, k, v, out = (unit_stride_rows(t) for t in (dout, q, k, v, out))
        band = band_of(causal, window, q_offset, k_offset)
        sq, sk = q.shape[1], k.shape[1]
        if band.causal_shift(sq, sk) == 1 and sq > 1:
            dq, dk, dv = self.backward(dout[:, 1:], q[:, 1:], k[:, :-1], v[:, :-1], out[:, 1:], lse[:, :, 1:],
                                       scale=scale, causal=True)
            return (torch.cat([torch.zeros_like(q[:, :1]), dq], dim=1),
                    torch.cat([dk, torch.zeros_like(k[:, :1])], dim=1), torch.cat([dv, torch.zeros_like(v[:, :1])], dim=1))
        is_causal = band.is_top_left_causal(sq, sk)
        plain = band.unbounded or is_causal
        lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        # A row that saw no key has lse = -inf; any finite value gives it zero probabilities instead of NaN.
        lse = lse.masked_fill(lse == float("-inf"), 0.0)
        if q.device.type == "cpu":
            mask = None if plain else _bias(band, sq, sk, q.device, q.dtype)
            dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
                _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse, 0.0, is_causal,
                attn_mask=mask, scale=scale)
            return _bhsd(dq), _bhsd(dk), _bhsd(dv)

        lse = lse.contiguous()
        groups = q.shape[2] // k.shape[2]
        qh, douth, outh = _bhsd(q), _bhsd(dout), _bhsd(out)
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        # cum_seq_q/k = None: not variable-length (an empty tensor would select the varlen kernels).
        if plain and q.dtype in _HALF and q.device.type == "cuda" and _cudnn_serves(sq, sk):
            dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
                douth, qh, _bhsd(k), _bhsd(v), outh, lse.unsqueeze(-1), seed, seed, None, None, None, sq, sk, 0.0,
                is_causal, scale=scale)
        elif plain and q.dtype in _HALF:
            dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
                douth, qh, _bhsd(k), _bhsd(v), outh, lse, None, None, sq, sk, 0.0, is_causal, seed, seed,
                scale=scale)
        else:
            kh, vh = _bhsd(repeat_kv(k, groups)), _bhsd(repeat_kv(v, groups))
            bias = None if plain else _aligned_bias(band, sq, sk, q.shape[0], q.shape[2], q.device, q.dtype)
            padded = -(-sq // _EFFICIENT_LSE_ALIGN) * _EFFICIENT_LSE_ALIGN
            lse_padded = torch.nn.functional.pad(lse, (0, padded - sq))
            dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
                douth, qh, kh, vh, bias, outh, lse_padded, seed, seed, 0.0, [True, True, True, False],
                is_causal and bias is None, scale=scale)
        dq, dk, dv = _bhsd(dq), _bhsd(dk), _bhsd(dv)
        if dk.shape[2] != k.shape[2]:  # gradients of repeated K/V heads: sum each group
            dk, dv = sum_kv_groups(dk, groups), sum_kv_groups(dv, groups)
        return dq, dk, dv
