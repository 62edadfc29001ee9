"""Plain PyTorch math: any device, any dtype (float64 included). The test oracle.

Computes in float64 for float64 inputs and in float32 otherwise, materialising
the [seqlen_q, seqlen_k] score matrix: meant for correctness, not speed.
"""

from __future__ import annotations

import torch

from .base import KernelBackend, alibi_bias, band_of, lse_dtype, repeat_kv, sum_kv_groups


def _scores(q, k, scale, softcap, band, compute_dtype, alibi):
    """Masked (soft-capped, ALiBi-biased) scores [B, H, Sq, Sk] and the tanh needed by the backward."""
    s = torch.einsum("bihd,bjhd->bhij", q.to(compute_dtype), k.to(compute_dtype)) * scale
    tanh = None
    if softcap:
        tanh = torch.tanh(s / softcap)
        s = softcap * tanh
    if alibi:
        s = s + alibi_bias(alibi["alibi_slopes"], alibi["alibi_delta"], alibi["alibi_stride"], q.shape[1], k.shape[1],
                           compute_dtype)
    if not band.unbounded:
        visible = band.dense(q.shape[1], k.shape[1], device=q.device)
        s = s.masked_fill(~visible, float("-inf"))
    return s, tanh


class ReferenceBackend(KernelBackend):
    name = "reference"

    def unsupported_reason(self, features):
        return None

    def forward(self, q, k, v, *, scale, causal=False, window=(-1, -1), q_offset=0, k_offset=0, softcap=0.0, **alibi):
        compute_dtype = lse_dtype(q.dtype)
        groups = q.shape[2] // k.shape[2]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        band = band_of(causal, window, q_offset, k_offset)
        s, _ = _scores(q, k, scale, softcap, band, compute_dtype, alibi)
        lse = torch.logsumexp(s, dim=-1)  # -inf for rows that see nothing
        p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
        out = torch.einsum("bhij,bjhd->bihd", p, v.to(compute_dtype))
        return out.to(q.dtype), lse.to(lse_dtype(q.dtype))

    def backward(self, dout, q, k, v, out, lse, *, scale, causal=False, window=(-1, -1), q_offset=0, k_offset=0,
                 softcap=0.0, **alibi):
        compute_dtype = lse_dtype(q.dtype)
        groups = q.shape[2] // k.shape[2]
        k_rep, v_rep = repeat_kv(k, groups), repeat_kv(v, groups)
        band = band_of(causal, window, q_offset, k_offset)
        s, tanh = _scores(q, k_rep, scale, softcap, band, compute_dtype, alibi)
        p = torch.exp(s - lse.to(compute_dtype).unsqueeze(-1)).nan_to_num(0.0)
        dout_c = dout.to(compute_dtype)
        dv = torch.einsum("bhij,bihd->bjhd", p, dout_c)
        dp = torch.einsum("bihd,bjhd->bhij", dout_c, v_rep.to(compute_dtype))
        delta = (dout_c * out.to(compute_dtype)).sum(-1).transpose(1, 2).unsqueeze(-1)  # [B, H, Sq, 1]
        ds = p * (dp - delta)
        if softcap:
            ds = ds * (1 - tanh * tanh)
        dq = torch.einsum("bhij,bjhd->bihd", ds, k_rep.to(compute_dtype)) * scale
        dk = torch.einsum("bhij,bihd->bjhd", ds, q.to(compute_dtype)) * scale
        dk, dv = sum_kv_groups(dk, groups), sum_kv_groups(dv, groups)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
