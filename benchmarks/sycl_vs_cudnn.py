"""cuDNN (through PyTorch) on the block the SYCL harness times (benchmarks/sycl_harness.cpp ``--time SEQLEN``):
one causal block, batch 1, 32 query / 8 K/V heads, head dim 128, bf16; and PyTorch's float32 math path for
the harness's float32 timing. Same FLOP count as the harness (visible pairs x 4 D forward, x 10 D backward),
so the TFLOP/s compare in one device call.

    python benchmarks/sycl_vs_cudnn.py --seqlen 8192
"""

import argparse

import torch

aten = torch.ops.aten


def timed_ms(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlen", type=int, default=8192)
    args = parser.parse_args()
    s, h, hk, d = args.seqlen, 32, 8, 128
    pairs = s * (s + 1) / 2 * h
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "cudnn", torch.backends.cudnn.version())
    q = torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, hk, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)[:2]
    dout, seed = torch.randn_like(out), torch.zeros((), dtype=torch.int64, device="cuda")
    fwd = timed_ms(lambda: aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False))
    bwd = timed_ms(lambda: aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse, seed, seed, None, None, None, s, s, 0.0, True))
    print(f"cudnn bf16 d{d} seqlen {s} heads {h}/{hk} causal  forward {fwd:.3f} ms {4 * pairs * d / fwd / 1e9:.2f} "
          f"TFLOP/s  backward {bwd:.3f} ms {10 * pairs * d / bwd / 1e9:.2f} TFLOP/s")
    # float32 without TF32: what the harness's float32 kernels (scalar FP32) compare with
    torch.backends.cuda.matmul.allow_tf32 = False
    qf, kf, vf = (t.float() for t in (q, k, v))
    fwd32 = timed_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, is_causal=True,
                                                                              enable_gqa=True), reps=5)
    print(f"sdpa float32 (no TF32) d{d} seqlen {s} heads {h}/{hk} causal  forward {fwd32:.3f} ms "
          f"{4 * pairs * d / fwd32 / 1e9:.2f} TFLOP/s")


if __name__ == "__main__":
    main()
