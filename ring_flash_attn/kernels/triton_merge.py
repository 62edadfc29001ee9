"""One-pass LSE merge in Triton: the eager merge costs several passes over the
float32 accumulator per ring step (logaddexp, two exps, a multiply, an add, a
copy); this kernel reads the accumulator and the block once and writes the
accumulator once, which is the least memory traffic a separate merge can have.

Same semantics as :func:`ring_flash_attn.merge.merge_into`: rows whose merged
LSE is -inf keep ``out = 0`` and ``lse = -inf``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .base import unit_stride_rows


@triton.jit
def _merge_kernel(out_acc, lse_acc, out_blk, lse_blk,
                  seqlen, heads, head_dim,
                  s_oa_b, s_oa_s, s_oa_h,
                  s_la_b, s_la_h,
                  s_ob_b, s_ob_s, s_ob_h,
                  s_lb_b, s_lb_h,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # Head dimension and LSE's sequence dimension have stride 1 (checked by the caller).
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen
    tile_ok = row_ok[:, None] & (cols[None, :] < head_dim)

    la = tl.load(lse_acc + b * s_la_b + h * s_la_h + rows, mask=row_ok, other=float("-inf")).to(tl.float32)
    lb = tl.load(lse_blk + b * s_lb_b + h * s_lb_h + rows, mask=row_ok, other=float("-inf")).to(tl.float32)
    top = tl.maximum(la, lb)
    # A row unseen by both has top = -inf; any finite stand-in gives both weights 0 there.
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    ea = tl.exp2((la - top_safe) * 1.4426950408889634)
    eb = tl.exp2((lb - top_safe) * 1.4426950408889634)
    total = ea + eb
    seen = total > 0.0
    inv = tl.where(seen, 1.0 / tl.where(seen, total, 1.0), 0.0)
    lse_new = tl.where(seen, top_safe + tl.log2(tl.where(seen, total, 1.0)) * 0.6931471805599453, float("-inf"))

    oa_ptr = out_acc + b * s_oa_b + h * s_oa_h + rows[:, None] * s_oa_s + cols[None, :]
    ob_ptr = out_blk + b * s_ob_b + h * s_ob_h + rows[:, None] * s_ob_s + cols[None, :]
    oa = tl.load(oa_ptr, mask=tile_ok, other=0.0).to(tl.float32)
    ob = tl.load(ob_ptr, mask=tile_ok, other=0.0).to(tl.float32)
    merged = oa * (ea * inv)[:, None] + ob * (eb * inv)[:, None]
    tl.store(oa_ptr, merged.to(out_acc.dtype.element_ty), mask=tile_ok)
    tl.store(lse_acc + b * s_la_b + h * s_la_h + rows, lse_new.to(lse_acc.dtype.element_ty), mask=row_ok)


# Rows per program and warps, tuned on the device at first use per (seqlen, head_dim): the merge is
# memory-bound and the best shape depends on how many rows are in flight. The accumulators are
# restored after each trial, since the kernel updates them in place.
_merge_tuned = triton.autotune(
    [triton.Config({"BLOCK_S": rows}, num_warps=warps) for rows, warps in ((16, 4), (32, 4), (64, 4), (32, 8),
                                                                          (64, 8), (128, 8))],
    key=["seqlen", "head_dim"], restore_value=["out_acc", "lse_acc"])(_merge_kernel)


# CUDA limits a grid's y size to 65535; these kernels put (batch x heads) there, and a batched call of many
# small blocks (ring/batching.py: thousands of blocks x heads) goes past it. Such calls are launched in parts
# of the batch dim (views: same strides).
MAX_GRID_Y = 65535


def batch_parts(batch: int, heads: int) -> list:
    """Slices of the batch dim whose ``batch x heads`` programs each fit a grid's y size."""
    per = max(1, MAX_GRID_Y // heads)
    return [slice(start, min(start + per, batch)) for start in range(0, batch, per)]


def triton_merge_into(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_block: torch.Tensor,
                      lse_block: torch.Tensor) -> None:
    """In-place ``(out_acc, lse_acc) <- merge((out_acc, lse_acc), (out_block, lse_block))`` in one kernel.

    Shapes as in :func:`ring_flash_attn.merge.merge_into`; the accumulators must
    have unit stride in their last dimension (they are written in place).
    """
    if out_acc.stride(-1) != 1 or lse_acc.stride(-1) != 1:
        raise ValueError("out_acc/lse_acc: the Triton merge needs unit stride in the last dimension, got "
                         f"strides {tuple(out_acc.stride())} and {tuple(lse_acc.stride())}")
    out_block, lse_block = unit_stride_rows(out_block), unit_stride_rows(lse_block)
    b, s, h, d = out_acc.shape
    if s == 0:
        return
    if b * h > MAX_GRID_Y:
        for part in batch_parts(b, h):
            triton_merge_into(out_acc[part], lse_acc[part], out_block[part], lse_block[part])
        return
    args = (out_acc, lse_acc, out_block, lse_block, s, h, d,
            out_acc.stride(0), out_acc.stride(1), out_acc.stride(2), lse_acc.stride(0), lse_acc.stride(1),
            out_block.stride(0), out_block.stride(1), out_block.stride(2), lse_block.stride(0), lse_block.stride(1))
    block_d = triton.next_power_of_2(d)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":  # the interpreter cannot time configurations
        block_s = max(1, min(triton.next_power_of_2(s), 8192 // block_d))
        _merge_kernel[(triton.cdiv(s, block_s), b * h)](*args, BLOCK_S=block_s, BLOCK_D=block_d)
        return
    _merge_tuned[lambda meta: (triton.cdiv(s, meta["BLOCK_S"]), b * h)](*args, BLOCK_D=block_d)
