"""Flash attention in Triton, ring-aware: forward, forward_accumulate and backward.

One kernel source for CUDA, Intel GPUs (Intel's Triton backend) and the CPU
under ``TRITON_INTERPRET=1`` (how CI checks it). Masks are bands
(:mod:`.mask`): visible iff ``lo <= (q_offset + i) - (k_offset + j) <= hi``;
each program visits only the key (or query) tiles its band can reach. K/V heads
are read through ``head // groups`` (GQA without repeating K/V); dK/dV of one
K/V head sum over its query heads inside one program, so no atomics.

``forward_accumulate`` is the ring step: the kernel's epilogue reads the running
float32 ``(out, lse)`` of its query tile, folds the block in and writes them
back, so no block output is written and no separate merge pass runs.

Scores are computed in base 2 (``exp2``), as the fast units do; LSEs in and out
are natural logs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import triton_merge
from .base import Features, KernelBackend, band_of, lse_dtype, unit_stride_rows

LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# shared pieces


@triton.jit
def _visible(rows, cols, offset, lo, hi, seqlen_q, seqlen_k,
             HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """[BM, BN] mask: inside both sequences and inside the band."""
    ok = (rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k)
    d = rows[:, None] - cols[None, :] + offset
    if HAS_LO:
        ok = ok & (d >= lo)
    if HAS_HI:
        ok = ok & (d <= hi)
    return ok


@triton.jit
def _key_range(m0, offset, lo, hi, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """Key tiles [start, end) that rows m0 .. m0+BLOCK_M-1 can see, start aligned to BLOCK_N."""
    start = 0
    end = seqlen_k
    if HAS_HI:
        # j >= i + offset - hi, smallest for the first row.
        start = tl.maximum(m0 + offset - hi, 0)
        start = (start // BLOCK_N) * BLOCK_N
    if HAS_LO:
        # j <= i + offset - lo, largest for the last row.
        end = tl.minimum(m0 + BLOCK_M - 1 + offset - lo + 1, seqlen_k)
    return start, end


@triton.jit
def _query_range(n0, offset, lo, hi, seqlen_q, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """Query tiles [start, end) that keys n0 .. n0+BLOCK_N-1 are seen by, start aligned to BLOCK_M."""
    start = 0
    end = seqlen_q
    if HAS_LO:
        # i >= j - offset + lo, smallest for the first key.
        start = tl.maximum(n0 - offset + lo, 0)
        start = (start // BLOCK_M) * BLOCK_M
    if HAS_HI:
        # i <= j - offset + hi, largest for the last key.
        end = tl.minimum(n0 + BLOCK_N - 1 - offset + hi + 1, seqlen_q)
    return start, end


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with float32 accumulation; UPCAST computes it in float32 (the interpreter's bfloat16 dot is wrong)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


# ----------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse,
                s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh,
                s_ob, s_os, s_oh, s_lb, s_lh,
                seqlen_q, seqlen_k, heads, groups, head_dim,
                qk_scale_log2, offset, lo, hi,
                HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, ACCUMULATE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    hk = h // groups
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim

    q_ptr = Q + b * s_qb + h * s_qh + rows[:, None] * s_qs + dims[None, :]
    q = tl.load(q_ptr, mask=(rows[:, None] < seqlen_q) & dim_ok[None, :], other=0.0)
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, base-2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    start, end = _key_range(m0, offset, lo, hi, seqlen_k, BLOCK_M, BLOCK_N, HAS_LO, HAS_HI)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (cols[:, None] < seqlen_k) & dim_ok[None, :]
        k = tl.load(k_base + cols[:, None] * s_ks + dims[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * qk_scale_log2
        s = tl.where(_visible(rows, cols, offset, lo, hi, seqlen_q, seqlen_k, HAS_LO, HAS_HI), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen nothing keep m = -inf; a finite stand-in keeps exp2 from giving NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * s_vs + dims[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
        m_i = m_new

    seen = l_i > 0.0
    inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    lse_blk = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    row_ok = rows < seqlen_q
    o_ptr = Out + b * s_ob + h * s_oh + rows[:, None] * s_os + dims[None, :]
    l_ptr = Lse + b * s_lb + h * s_lh + rows
    tile_ok = row_ok[:, None] & dim_ok[None, :]
    if ACCUMULATE:
        # Fold into the running (out, lse): the same arithmetic as merge.merge_into.
        lse_run = tl.load(l_ptr, mask=row_ok, other=float("-inf"))
        top = tl.maximum(lse_run, lse_blk)
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        e_run = tl.exp2((lse_run - top_safe) * 1.4426950408889634)
        e_blk = tl.exp2((lse_blk - top_safe) * 1.4426950408889634)
        total = e_run + e_blk
        any_seen = total > 0.0
        inv_total = tl.where(any_seen, 1.0 / tl.where(any_seen, total, 1.0), 0.0)
        out_run = tl.load(o_ptr, mask=tile_ok, other=0.0)
        out_new = out_run * (e_run * inv_total)[:, None] + acc * (e_blk * inv_total * inv_l)[:, None]
        tl.store(o_ptr, out_new, mask=tile_ok)
        tl.store(l_ptr, tl.where(any_seen, top_safe + tl.log2(tl.where(any_seen, total, 1.0)) / 1.4426950408889634,
                                 float("-inf")), mask=row_ok)
    else:
        tl.store(o_ptr, (acc * inv_l[:, None]).to(Out.dtype.element_ty), mask=tile_ok)
        tl.store(l_ptr, lse_blk, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# backward


@triton.jit
def _bwd_delta_kernel(Out, dOut, Delta, s_ob, s_os, s_oh, s_db, s_ds, s_dh, seqlen_q, heads, head_dim,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[b, h, i] = sum_d dout * out (float32), the softmax backward's row term."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    ok = (rows[:, None] < seqlen_q) & (dims[None, :] < head_dim)
    o = tl.load(Out + b * s_ob + h * s_oh + rows[:, None] * s_os + dims[None, :], mask=ok, other=0.0)
    do = tl.load(dOut + b * s_db + h * s_dh + rows[:, None] * s_ds + dims[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh * seqlen_q + rows, delta, mask=rows < seqlen_q)


@triton.jit
def _row_lse_log2(Lse, lse_row_base, rows, seqlen_q):
    """Global LSE of rows in base 2; rows that saw no key (-inf) become +inf so their probabilities are 0."""
    lse = tl.load(Lse + lse_row_base + rows, mask=rows < seqlen_q, other=0.0) * 1.4426950408889634
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, dOut, Lse, Delta, dK, dV,
                     s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_db, s_ds, s_dh,
                     s_lb, s_lh, s_dkb, s_dks, s_dkh, s_dvb, s_dvs, s_dvh,
                     seqlen_q, seqlen_k, heads, heads_k, groups, head_dim,
                     sm_scale, qk_scale_log2, offset, lo, hi,
                     HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    b = pid_bhk // heads_k
    hk = pid_bhk % heads_k
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    kv_mask = (cols[:, None] < seqlen_k) & dim_ok[None, :]
    k = tl.load(K + b * s_kb + hk * s_kh + cols[:, None] * s_ks + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * s_vb + hk * s_vh + cols[:, None] * s_vs + dims[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    start, end = _query_range(n0, offset, lo, hi, seqlen_q, BLOCK_M, BLOCK_N, HAS_LO, HAS_HI)
    for g in range(0, groups):
        h = hk * groups + g
        q_base = Q + b * s_qb + h * s_qh
        do_base = dOut + b * s_db + h * s_dh
        lse_base = b * s_lb + h * s_lh
        delta_base = Delta + (b * heads + h) * seqlen_q
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            q_mask = (rows[:, None] < seqlen_q) & dim_ok[None, :]
            q = tl.load(q_base + rows[:, None] * s_qs + dims[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_base + rows[:, None] * s_ds + dims[None, :], mask=q_mask, other=0.0)
            lse2 = _row_lse_log2(Lse, lse_base, rows, seqlen_q)
            delta = tl.load(delta_base + rows, mask=rows < seqlen_q, other=0.0)
            # Transposed scores [BN, BM], so dK/dV accumulate without transposing the large tiles.
            st = _dot(k, tl.trans(q), DOT_PRECISION, DOT_UPCAST) * qk_scale_log2
            visible_t = tl.trans(_visible(rows, cols, offset, lo, hi, seqlen_q, seqlen_k, HAS_LO, HAS_HI))
            pt = tl.where(visible_t, tl.exp2(st - lse2[None, :]), 0.0)
            dv += _dot(pt.to(do.dtype), do, DOT_PRECISION, DOT_UPCAST)
            dpt = _dot(v, tl.trans(do), DOT_PRECISION, DOT_UPCAST)
            dst = pt * (dpt - delta[None, :])
            dk += _dot(dst.to(q.dtype), q, DOT_PRECISION, DOT_UPCAST)
    tl.store(dK + b * s_dkb + hk * s_dkh + cols[:, None] * s_dks + dims[None, :],
             (dk * sm_scale).to(dK.dtype.element_ty), mask=kv_mask)
    tl.store(dV + b * s_dvb + hk * s_dvh + cols[:, None] * s_dvs + dims[None, :],
             dv.to(dV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, dOut, Lse, Delta, dQ,
                   s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_db, s_ds, s_dh,
                   s_lb, s_lh, s_dqb, s_dqs, s_dqh,
                   seqlen_q, seqlen_k, heads, groups, head_dim,
                   sm_scale, qk_scale_log2, offset, lo, hi,
                   HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    hk = h // groups
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q_mask = (rows[:, None] < seqlen_q) & dim_ok[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qs + dims[None, :], mask=q_mask, other=0.0)
    do = tl.load(dOut + b * s_db + h * s_dh + rows[:, None] * s_ds + dims[None, :], mask=q_mask, other=0.0)
    lse2 = _row_lse_log2(Lse, b * s_lb + h * s_lh, rows, seqlen_q)
    delta = tl.load(Delta + (b * heads + h) * seqlen_q + rows, mask=rows < seqlen_q, other=0.0)
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    start, end = _key_range(m0, offset, lo, hi, seqlen_k, BLOCK_M, BLOCK_N, HAS_LO, HAS_HI)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (cols[:, None] < seqlen_k) & dim_ok[None, :]
        k = tl.load(k_base + cols[:, None] * s_ks + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * s_vs + dims[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * qk_scale_log2
        visible = _visible(rows, cols, offset, lo, hi, seqlen_q, seqlen_k, HAS_LO, HAS_HI)
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), DOT_PRECISION, DOT_UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_PRECISION, DOT_UPCAST)
    tl.store(dQ + b * s_dqb + h * s_dqh + rows[:, None] * s_dqs + dims[None, :],
             (dq * sm_scale).to(dQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------
# launch


def _band_args(causal, window, q_offset, k_offset):
    band = band_of(causal, window, q_offset, k_offset)
    return dict(offset=band.offset, lo=0 if band.lo is None else band.lo, hi=0 if band.hi is None else band.hi,
                HAS_LO=band.lo is not None, HAS_HI=band.hi is not None)


def _dot_args(dtype) -> dict:
    # float32 inputs get full-precision products: TF32 (Triton's default) would lose the float32 contract.
    # Triton's interpreter (seen with 3.7.1) returns garbage for bfloat16 dots, so interpreted runs upcast them.
    return dict(DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                DOT_UPCAST=_interpreted() and dtype == torch.bfloat16)


def _tiles(head_dim: int, dtype, interpreted: bool, kind: str) -> dict:
    """Fixed tile sizes and launch shape: the backward, and forwards the autotuner does not cover.

    Interpreted (CPU CI): small tiles, so masks and partial tiles are exercised on tiny inputs.
    GPU: 64x64 backward tiles for half precision, d <= 128; float32 or wider heads get smaller
    tiles to fit shared memory.
    """
    if interpreted:
        return dict(BLOCK_M=16, BLOCK_N=16)
    wide = dtype == torch.float32 or head_dim > 128
    if kind == "fwd":
        return dict(BLOCK_M=64 if wide else 128, BLOCK_N=32 if wide else 64, num_warps=8 if not wide else 4,
                    num_stages=2 if wide else 3)
    return dict(BLOCK_M=32 if wide else 64, BLOCK_N=32 if wide else 64, num_warps=4 if wide else 8,
                num_stages=1 if wide else 2)


def _check_last_stride(**tensors):
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the Triton kernels need unit stride in head_dim, got strides {tuple(t.stride())}")


# Forward tiles for half precision, head_dim <= 128, tuned on the device at first use per
# (seqlen_q, seqlen_k, head_dim, dtypes). Out/Lse are restored after each trial: with ACCUMULATE
# they are read and updated in place.
_fwd_tuned = triton.autotune(
    [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
     for m, n, w, st in ((128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4))],
    key=["seqlen_q", "seqlen_k", "head_dim"], restore_value=["Out", "Lse"])(_fwd_kernel)


def _launch_forward(q, k, v, out, lse, scale, band, accumulate):
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    args = (q, k, v, out, lse,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1),
            sq, sk, h, h // hk, d, scale * LOG2E)
    consts = dict(**band, ACCUMULATE=accumulate, BLOCK_D=max(16, triton.next_power_of_2(d)), **_dot_args(q.dtype))
    if not _interpreted() and q.dtype != torch.float32 and d <= 128:
        _fwd_tuned[lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * h)](*args, **consts)
        return
    tiles = _tiles(d, q.dtype, _interpreted(), "fwd")
    _fwd_kernel[(triton.cdiv(sq, tiles["BLOCK_M"]), b * h)](*args, **consts, **tiles)


class TritonBackend(KernelBackend):
    """Flash attention in Triton with the ring step folded into the forward's epilogue."""

    name = "triton"

    def unsupported_reason(self, f: Features):
        if f.softcap:
            return "the Triton kernels have no logit soft-capping"
        if f.alibi:
            return "the Triton kernels have no ALiBi"
        if f.dtype not in _DTYPES:
            return f"the Triton kernels take float16, bfloat16 or float32, got {f.dtype}"
        if f.head_dim > 256:
            return f"the Triton kernels take head_dim <= 256, got {f.head_dim}"
        if f.device_type == "cpu" and not _interpreted():
            return "Triton runs on the CPU only interpreted (TRITON_INTERPRET=1), which is for tests"
        if f.device_type not in ("cuda", "xpu", "cpu"):
            return f"no Triton backend for device type {f.device_type!r}"
        return None

    def forward(self, q, k, v, *, scale, causal=False, window=(-1, -1), q_offset=0, k_offset=0, softcap=0.0):
        if softcap:
            raise NotImplementedError("softcap: the triton backend cannot apply logit soft-capping")
        # (batch x heads) programs past a grid's y size (a batched call of many blocks): in parts of the batch
        if q.shape[0] * q.shape[2] > triton_merge.MAX_GRID_Y:
            parts = [self.forward(q[p], k[p], v[p], scale=scale, causal=causal, window=window, q_offset=q_offset,
                                  k_offset=k_offset) for p in triton_merge.batch_parts(q.shape[0], q.shape[2])]
            return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])
        q, k, v = unit_stride_rows(q), unit_stride_rows(k), unit_stride_rows(v)
        b, sq, h, _ = q.shape
        out = torch.empty_like(q)
        lse = torch.empty(b, h, sq, dtype=lse_dtype(q.dtype), device=q.device)
        if sq:
            _launch_forward(q, k, v, out, lse, scale, _band_args(causal, window, q_offset, k_offset), False)
        return out, lse

    def forward_accumulate(self, q, k, v, out_acc, lse_acc, *, scale, causal=False, window=(-1, -1),
                           q_offset=0, k_offset=0, softcap=0.0) -> None:
        if softcap:
            raise NotImplementedError("softcap: the triton backend cannot apply logit soft-capping")
        if out_acc.dtype != torch.float32 or lse_acc.dtype != torch.float32:
            raise ValueError(f"out_acc/lse_acc: expected float32 accumulators, got {out_acc.dtype}/{lse_acc.dtype}")
        _check_last_stride(out_acc=out_acc, lse_acc=lse_acc)
        if q.shape[0] * q.shape[2] > triton_merge.MAX_GRID_Y:  # in parts of the batch, as forward
            for p in triton_merge.batch_parts(q.shape[0], q.shape[2]):
                self.forward_accumulate(q[p], k[p], v[p], out_acc[p], lse_acc[p], scale=scale, causal=causal,
                                        window=window, q_offset=q_offset, k_offset=k_offset)
            return
        q, k, v = unit_stride_rows(q), unit_stride_rows(k), unit_stride_rows(v)
        if q.shape[1]:
            _launch_forward(q, k, v, out_acc, lse_acc, scale, _band_args(causal, window, q_offset, k_offset), True)

    def backward(self, dout, q, k, v, out, lse, *, scale, causal=False, window=(-1, -1), q_offset=0, k_offset=0,
                 softcap=0.0):
        if softcap:
            raise NotImplementedError("softcap: the triton backend cannot apply logit soft-capping")
        if q.shape[0] * q.shape[2] > triton_merge.MAX_GRID_Y:  # in parts of the batch, as forward
            parts = [self.backward(dout[p], q[p], k[p], v[p], out[p], lse[p], scale=scale, causal=causal,
                                   window=window, q_offset=q_offset, k_offset=k_offset)
                     for p in triton_merge.batch_parts(q.shape[0], q.shape[2])]
            return tuple(torch.cat(grads) for grads in zip(*parts))
        q, k, v, dout, out = (unit_stride_rows(x) for x in (q, k, v, dout, out))
        lse = unit_stride_rows(lse.float())
        b, sq, h, d = q.shape
        sk, hk = k.shape[1], k.shape[2]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if sq == 0 or sk == 0:
            return dq.zero_(), dk.zero_(), dv.zero_()
        band = _band_args(causal, window, q_offset, k_offset)
        interpreted = _interpreted()
        block_d = max(16, triton.next_power_of_2(d))
        dot_args = _dot_args(q.dtype)
        delta = torch.empty(b, h, sq, dtype=torch.float32, device=q.device)
        delta_rows = 16 if interpreted else 64
        _bwd_delta_kernel[(triton.cdiv(sq, delta_rows), b * h)](
            out, dout, delta, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
            dout.stride(2), sq, h, d, BLOCK_M=delta_rows, BLOCK_D=block_d)
        strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
                   lse.stride(0), lse.stride(1))
        tiles = _tiles(d, q.dtype, interpreted, "bwd")
        _bwd_dkdv_kernel[(triton.cdiv(sk, tiles["BLOCK_N"]), b * hk)](
            q, k, v, dout, lse, delta, dk, dv, *strides,
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            sq, sk, h, hk, h // hk, d, scale, scale * LOG2E, **band,
            BLOCK_D=block_d, **dot_args, **tiles)
        _bwd_dq_kernel[(triton.cdiv(sq, tiles["BLOCK_M"]), b * h)](
            q, k, v, dout, lse, delta, dq, *strides, dq.stride(0), dq.stride(1), dq.stride(2),
            sq, sk, h, h // hk, d, scale, scale * LOG2E, **band,
            BLOCK_D=block_d, **dot_args, **tiles)
        return dq, dk, dv
