"""Host (CPU) time per call of each piece of a ring step, on a CUDA device.

benchmarks/ring_step.py showed the engine's host time per step close to its device
time at 4k tokens per rank (launch-bound). This attributes that host time: tiny
shapes, so the device never holds the host back, many calls, mean microseconds
per call measured on the host clock, one device sync at the end.

    python benchmarks/host_overhead.py
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ring_flash_attn.comm.loopback import LoopbackComm  # noqa: E402
from ring_flash_attn.kernels import get_backend  # noqa: E402
from ring_flash_attn.kernels.mask import Band  # noqa: E402
from ring_flash_attn.merge import merge_into, merge_into_eager, new_accumulators  # noqa: E402
from ring_flash_attn.ring import RingPlan, get_layout, ring_forward  # noqa: E402

aten = torch.ops.aten


def host_us(fn, calls=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return host


def main():
    s, h, hk, d, world_size = 256, 4, 1, 128, 8
    q = torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16)
    kv = [torch.randn(2, 1, s, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(world_size)]
    k, v = kv[0][0], kv[0][1]
    sdpa, triton_backend = get_backend("sdpa"), get_backend("triton")
    out, lse = sdpa.forward(q, k, v, scale=0.1)
    acc_out, acc_lse = new_accumulators(q)
    comm = LoopbackComm(1, kv)
    recv = torch.empty_like(kv[0])
    plans = {name: RingPlan(layout=get_layout("ring"), band=Band(), scale=0.1, softcap=0.0, backend=get_backend(name),
                            comm=comm) for name in ("sdpa", "triton")}
    rows = {
        "cudnn op (aten), K/V as given": host_us(lambda: aten._scaled_dot_product_cudnn_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, False, False, scale=0.1)),
        "sdpa.forward": host_us(lambda: sdpa.forward(q, k, v, scale=0.1)),
        "merge_into (Triton, autotuned)": host_us(lambda: merge_into(acc_out, acc_lse, out, lse)),
        "merge_into_eager": host_us(lambda: merge_into_eager(acc_out, acc_lse, out, lse)),
        "triton forward_accumulate": host_us(lambda: triton_backend.forward_accumulate(q, k, v, acc_out, acc_lse,
                                                                                       scale=0.1)),
        "loopback exchange + wait": host_us(lambda: comm.exchange(kv[0], recv).wait()),
        "empty torch op (x.add_(0))": host_us(lambda: acc_lse.add_(0)),
    }
    for name, plan in plans.items():
        rows[f"engine ring_forward P={world_size}, {name}, per step"] = host_us(
            lambda: ring_forward(q, k, v, plan), calls=50) / world_size
    width = max(map(len, rows))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, us in rows.items():
        print(f"{name:{width}}  {us:8.1f} us")


if __name__ == "__main__":
    main()
