"""What the cross-rank checks of ring_flash_attn.agreement cost per call.

Launch with ``torchrun --nproc_per_node N benchmarks/agreement_cost.py [--device cpu|cuda|xpu]``
(CPU ranks use gloo; GPUs NCCL or XCCL). Rank 0 prints, per call (mean over
``--iters``, after ``--warmup``):

* ``describe``: building the call's description (every call, every mode);
* ``agree (once, repeated call)``: the steady state of the default mode, no collective;
* ``agree (always)``: one all-gather of four integers per rank;
* ``finish``: the failure check after the last exchange (one all-gather of four
  integers; once per forward and once per backward);
* one whole attention call (forward + backward; ``--exchange`` ring, allgather or ulysses) under each of
  ``RING_FLASH_ATTN_AGREE=never|once|always`` (median; modes interleaved call by
  call), and the difference to ``never``.

The checks never touch a device: on a group with gloo (CPU ranks, or
``backend="cuda:nccl,cpu:gloo"``) the all-gathers are tagged sends and receives of
CPU tensors on the group itself, and for a device-only group (plain ``nccl``) they
run on a gloo group over the same ranks, made at the group's first agreement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from ring_flash_attn import agreement, ring_attention, ulysses_attention
from ring_flash_attn.comm.launch import init_distributed


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)


def per_call_us(fn, iters: int, warmup: int, device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    dist.barrier()
    started = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - started) / iters * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or xpu")
    parser.add_argument("--iters", type=int, default=2000, help="calls per micro-measurement")
    parser.add_argument("--call-iters", type=int, default=30, help="calls per whole-attention measurement")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seqlen", type=int, default=512, help="local sequence length of the whole call")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--backend", help='process-group backend, e.g. "cuda:nccl,cpu:gloo" (default: by device)')
    parser.add_argument("--exchange", default="ring", choices=("ring", "allgather", "ulysses"),
                        help="the exchange of the whole-call measurement")
    parser.add_argument("--json", help="write the figures here (rank 0)")
    args = parser.parse_args()

    _, device = init_distributed(device_type=args.device, backend=args.backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device="cpu").manual_seed(rank)
    shape = (1, args.seqlen, args.heads, args.head_dim)
    q, k, v, dout = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(4))
    q.requires_grad_()
    items = agreement.describe(q, k, v, exchange="ring", causal=True, window_size=(-1, -1),
                               softmax_scale=args.head_dim ** -0.5, softcap=0.0, alibi_slopes=None,
                               variant="zigzag", cu_seqlens=None)

    figures = {"world_size": world_size, "device": str(device), "backend": str(dist.get_backend()),
               "torch": torch.__version__, "shape": list(shape), "dtype": args.dtype, "exchange": args.exchange}
    figures["describe_us"] = per_call_us(
        lambda: agreement.describe(q, k, v, exchange="ring", causal=True, window_size=(-1, -1),
                                   softmax_scale=args.head_dim ** -0.5, softcap=0.0, alibi_slopes=None,
                                   variant="zigzag", cu_seqlens=None), args.iters, args.warmup, device)
    os.environ[agreement.MODE_ENV] = "once"
    agreement.agree(None, items, device)  # agreed once; every later identical call skips the collective
    figures["agree_once_repeated_us"] = per_call_us(lambda: agreement.agree(None, items, device),
                                                    args.iters, args.warmup, device)
    os.environ[agreement.MODE_ENV] = "always"
    figures["agree_always_us"] = per_call_us(lambda: agreement.agree(None, items, device),
                                             args.iters, args.warmup, device)
    figures["finish_us"] = per_call_us(lambda: agreement.finish(None, None, device, "benchmark"),
                                       args.iters, args.warmup, device)

    def attention_call():
        if args.exchange == "ulysses":  # Ulysses over the whole group (heads must divide by N)
            out, _ = ulysses_attention(q, k, v, variant="zigzag", causal=True)
        else:
            out, _ = ring_attention(q, k, v, variant="zigzag", causal=True, exchange=args.exchange)
        out.backward(dout)

    # Modes interleaved call by call and medians taken: a loaded machine drifts more than these checks cost.
    modes = ("never", "once", "always")
    times = {mode: [] for mode in modes}
    for _ in range(args.call_iters + 3):
        for mode in modes:
            os.environ[agreement.MODE_ENV] = mode
            times[mode].append(per_call_us(attention_call, 1, 0, device))
    for mode in modes:
        figures[f"call_{mode}_us"] = statistics.median(times[mode][3:])
    for mode in ("once", "always"):
        figures[f"call_{mode}_minus_never_us"] = figures[f"call_{mode}_us"] - figures["call_never_us"]

    if rank == 0:
        print(f"agreement cost per call: {world_size} ranks, {device}, backend {figures['backend']}, "
              f"torch {torch.__version__}")
        width = max(map(len, figures))
        for name, value in figures.items():
            print(f"  {name:<{width}}  {value:.1f}" if isinstance(value, float) else f"  {name:<{width}}  {value}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(figures, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
