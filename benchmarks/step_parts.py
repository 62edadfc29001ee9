"""What one non-causal ring step is made of, timed part by part on a CUDA device.

For each S (tokens per rank), one Q(S) x K/V(S) block, bf16, 32 query heads,
8 K/V heads, head dim 128: the library kernel (cuDNN on K/V already repeated),
the K/V head repeat the sdpa backend adds for GQA, the merges (eager and fused),
the Triton kernels, and the backward counterparts. With the memory-bound parts'
bytes, their achieved bandwidth is printed too. Prints a table; writes JSON.

    python benchmarks/step_parts.py --out benchmarks/results/step_parts.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ring_flash_attn.bench import Timer  # noqa: E402
from ring_flash_attn.kernels import get_backend  # noqa: E402
from ring_flash_attn.kernels.base import repeat_kv  # noqa: E402
from ring_flash_attn.merge import merge_into, merge_into_eager, new_accumulators  # noqa: E402

aten = torch.ops.aten


def median_ms(fn, warmup=3, reps=20):
    return Timer(torch.device("cuda")).median_ms(fn, warmup, reps)


def parts(seqlen, slow_paths, heads=32, heads_k=8, head_dim=128, dtype=torch.bfloat16):
    dev = "cuda"
    scale = head_dim ** -0.5
    q = torch.randn(1, seqlen, heads, head_dim, device=dev, dtype=dtype)
    k, v = (torch.randn(1, seqlen, heads_k, head_dim, device=dev, dtype=dtype) for _ in range(2))
    dout = torch.randn_like(q)
    groups = heads // heads_k
    kr, vr = repeat_kv(k, groups), repeat_kv(v, groups)
    qh, kh, vh = q.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2)
    sdpa, triton_backend = get_backend("sdpa"), get_backend("triton")
    out, lse = sdpa.forward(q, k, v, scale=scale)
    out_acc, lse_acc = new_accumulators(q)
    out_acc.normal_()
    lse_acc.normal_()
    cudnn_out, cudnn_lse = aten._scaled_dot_product_cudnn_attention(qh, kh, vh, None, True, 0.0, False, False,
                                                                    scale=scale)[:2]
    seed = torch.zeros((), dtype=torch.int64, device=dev)
    kw = dict(scale=scale)
    t = {
        "cudnn fwd": median_ms(lambda: aten._scaled_dot_product_cudnn_attention(
            qh, kh, vh, None, True, 0.0, False, False, scale=scale)),
        "cudnn fwd, native GQA": median_ms(lambda: aten._scaled_dot_product_cudnn_attention(
            qh, k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, False, False, scale=scale)),
        "repeat K/V (GQA)": median_ms(lambda: (repeat_kv(k, groups), repeat_kv(v, groups))),
        "sdpa.forward": median_ms(lambda: sdpa.forward(q, k, v, **kw)),
        "eager merge": median_ms(lambda: merge_into_eager(out_acc, lse_acc, out, lse)),
        "fused merge": median_ms(lambda: merge_into(out_acc, lse_acc, out, lse)),
        "triton forward": median_ms(lambda: triton_backend.forward(q, k, v, **kw)),
        "triton forward_accumulate": median_ms(lambda: triton_backend.forward_accumulate(q, k, v, out_acc, lse_acc,
                                                                                         **kw)),
        "cudnn bwd": median_ms(lambda: aten._scaled_dot_product_cudnn_attention_backward(
            dout.transpose(1, 2), qh, kh, vh, cudnn_out, cudnn_lse, seed, seed, None, None, None, seqlen, seqlen,
            0.0, False, scale=scale)),
        "sdpa.backward": median_ms(lambda: sdpa.backward(dout, q, k, v, out, lse, **kw)),
        "triton backward": median_ms(lambda: triton_backend.backward(dout, q, k, v, out, lse, **kw)),
    }
    flops = 4 * heads * seqlen * seqlen * head_dim
    merge_bytes = out_acc.numel() * 8 + out.numel() * out.element_size() + lse.numel() * 4 * 3
    t["_fwd TFLOP/s cudnn"] = flops / t["cudnn fwd"] / 1e9
    t["_fwd TFLOP/s triton"] = flops / t["triton forward"] / 1e9
    t["_fused merge GB/s"] = merge_bytes / t["fused merge"] / 1e6
    t["_merge bytes floor ms at 3.0 TB/s"] = merge_bytes / 3.0e9
    if not slow_paths:
        return t
    # Where cuDNN cannot serve: a band (causal, query block 1/2 a block later) and float32.
    band = dict(scale=scale, causal=True, q_offset=seqlen // 2)
    t["band: sdpa fwd (efficient op + bias)"] = median_ms(lambda: sdpa.forward(q, k, v, **band))
    t["band: triton fwd"] = median_ms(lambda: triton_backend.forward(q, k, v, **band))
    t["band: sdpa bwd"] = median_ms(lambda: sdpa.backward(dout, q, k, v, out, lse, **band))
    t["band: triton bwd"] = median_ms(lambda: triton_backend.backward(dout, q, k, v, out, lse, **band))
    q32, k32, v32, dout32 = q.float(), k.float(), v.float(), dout.float()
    out32, lse32 = triton_backend.forward(q32, k32, v32, **kw)
    t["fp32: sdpa fwd (efficient op)"] = median_ms(lambda: sdpa.forward(q32, k32, v32, **kw), reps=5)
    t["fp32: triton fwd"] = median_ms(lambda: triton_backend.forward(q32, k32, v32, **kw), reps=5)
    t["fp32: sdpa bwd"] = median_ms(lambda: sdpa.backward(dout32, q32, k32, v32, out32, lse32, **kw), reps=5)
    t["fp32: triton bwd"] = median_ms(lambda: triton_backend.backward(dout32, q32, k32, v32, out32, lse32, **kw),
                                      reps=5)
    return t


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seqlens", nargs="+", type=int, default=[4096, 8192, 16384])
    parser.add_argument("--out", default="benchmarks/results/step_parts.json")
    args = parser.parse_args()
    results = {s: parts(s, slow_paths=s == args.seqlens[0]) for s in args.seqlens}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, results=results), f, indent=1)
    names = list(results[args.seqlens[0]])
    print("| part (ms unless named) | " + " | ".join(f"S={s}" for s in args.seqlens) + " |")
    print("|---|" + "---|" * len(args.seqlens))
    for n in names:
        print(f"| {n.lstrip('_')} | " + " | ".join(f"{results[s][n]:.3f}" if n in results[s] else "" for s in args.seqlens) + " |")


if __name__ == "__main__":
    main()
