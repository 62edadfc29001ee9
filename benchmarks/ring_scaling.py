"""Multi-rank scaling of the ring schedules, against PyTorch's own context parallel.

Launch with ``torchrun --nproc_per_node N benchmarks/ring_scaling.py [options]``
(CPU ranks use gloo; GPUs NCCL or XCCL). For each variant and per-rank length:

* time per step, forward and forward+backward (median over ``--iters``);
* ring efficiency = ideal / measured, the ideal being this rank's FLOPs at the
  speed of the best single-device kernel measured in the same job (P
  back-to-back calls on full S_local blocks, no merge);
* how much communication is hidden: the same schedule with compute only (a
  communicator that moves nothing), with communication only (the same
  exchanges, no kernels), and both overlapped; hidden = (comm + compute -
  overlapped) / comm;
* peak device memory per rank;
* PyTorch's ``context_parallel`` on the same shapes (where it runs) for a
  side-by-side ratio.

``ulysses`` is DeepSpeed-Ulysses over all ranks (all-to-all by heads, causal, contiguous
layout); ``usp`` is Ulysses inside the ring on a ``--ulysses-size`` x ``P / ulysses-size``
mesh (zigzag, causal). Both need the heads (and for the ideal, nothing else) divisible by
their Ulysses degree; the compute/communication split is measured for the ring exchange only.

Before timing, every variant's output and gradients are checked against a
float32 single-device reference on a small shape. Rank 0 prints a table and
writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

from ring_flash_attn import ring_attention, shard_sequence, usp_attention, usp_process_groups
from ring_flash_attn.comm.launch import init_distributed
from ring_flash_attn.comm.ring import RingComm, SingleProcessFinish
from ring_flash_attn.kernels import Features, get_backend, select_backend

VARIANTS = {  # name -> (layout, causal, exchange)
    "ring": ("ring", False, "ring"),
    "zigzag": ("zigzag", True, "ring"),
    "stripe": ("stripe", True, "ring"),
    "llama3": ("ring", True, "allgather"),
    "ulysses": ("ring", True, "ulysses"),
    "usp": ("zigzag", True, "usp"),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class _Done:
    def wait(self):
        pass


class ComputeOnlyComm(SingleProcessFinish):
    """The ring's shape without its traffic: every exchange completes at once and moves nothing."""

    def __init__(self, comm: RingComm):
        self.rank, self.world_size = comm.rank, comm.world_size

    def exchange(self, send, recv, kind="kv"):
        return _Done()


def sync(device):
    if device.type != "cpu":
        getattr(torch, device.type).synchronize()


def median_time(fn, device, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        dist.barrier()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    # The slowest rank sets the step time.
    worst = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()


def attention_flops(seqlen_q: int, seqlen_k: int, heads: int, head_dim: int, batch: int, fraction: float) -> float:
    """Forward FLOPs (two matmuls) of a block where ``fraction`` of the score matrix is visible."""
    return 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim * fraction


def rank_flops(variant: str, world: int, seqlen_local: int, args) -> float:
    """This rank's forward FLOPs; causal layouts here are balanced, so each rank gets 1/P of the causal total."""
    _, causal, _ = VARIANTS[variant]
    total = seqlen_local * world
    full = attention_flops(total, total, args.heads, args.head_dim, args.batch, 0.5 if causal else 1.0)
    return full / world


def attention(variant: str, q, k, v, args, meshes, comm=None):
    """One call of ``variant``'s attention on this rank's slices; returns ``(out, lse)``."""
    layout, causal, exchange = VARIANTS[variant]
    if exchange in meshes:
        return usp_attention(q, k, v, **meshes[exchange].attention_groups(), variant=layout, causal=causal,
                             backend=args.backend)
    return ring_attention(q, k, v, variant=layout, causal=causal, exchange=exchange, heads_k_stride=args.heads_k,
                          backend=args.backend, comm=comm)


def ulysses_meshes(args, world):
    """The process groups of the Ulysses variants asked for (creating them is collective: every rank calls)."""
    sizes = {"ulysses": world, "usp": args.ulysses_size or (2 if world % 2 == 0 else 1)}
    return {exchange: usp_process_groups(sizes[exchange]) for exchange in sizes
            if any(VARIANTS[v][2] == exchange for v in args.variants)}


def check_correctness(args, device, dtype, rank, world, meshes):
    """Small-shape check of every variant against a float32 single-device reference."""
    reference = get_backend("reference")
    g = torch.Generator().manual_seed(1234)
    seqlen = 16 * world
    # 2P query heads over 2 K/V heads: the Ulysses variants split the heads over up to P ranks
    shape_q, shape_k = (1, seqlen, 2 * world, 64), (1, seqlen, 2, 64)
    small = argparse.Namespace(**dict(vars(args), heads_k=1, backend=None))  # llama3's K/V heads one at a time
    q, k, v, dout = (torch.randn(s, generator=g) for s in (shape_q, shape_k, shape_k, shape_q))
    worst = {}
    for variant in args.variants:
        layout, causal, exchange = VARIANTS[variant]
        ref_out, ref_lse = reference.forward(q, k, v, scale=64 ** -0.5, causal=causal)
        ref_grads = reference.backward(dout, q, k, v, ref_out, ref_lse, scale=64 ** -0.5, causal=causal)
        local = [shard_sequence(t, layout, rank, world).to(device=device, dtype=dtype) for t in (q, k, v, dout)]
        ql, kl, vl = (t.requires_grad_() for t in local[:3])
        out, _ = attention(variant, ql, kl, vl, small, meshes)
        out.backward(local[3])
        pairs = [(out, ref_out)] + list(zip((ql.grad, kl.grad, vl.grad), ref_grads))
        errs = [((a.float().cpu() - shard_sequence(b, layout, rank, world)).norm()
                 / shard_sequence(b, layout, rank, world).norm()).item() for a, b in pairs]
        worst[variant] = max(errs)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    bad = {v: e for v, e in worst.items() if not e <= tolerance}
    if bad:
        raise SystemExit(f"rank {rank}: correctness check failed (rel err > {tolerance}): {bad}")
    return worst


def torch_context_parallel_time(args, device, dtype, seqlen_local, causal, world):
    """PyTorch's context_parallel (ring over SDPA via DTensor) on the same shapes; None where it cannot run."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as exc:
        return None, f"unavailable: {exc}"
    try:
        mesh = init_device_mesh(device.type, (world,))
        total = seqlen_local * world
        # PyTorch's context parallel takes equal K/V and query heads only: give it repeated K/V heads. It shards
        # the buffers in place, so they must not require grad; the leaves that do are made inside.
        q, k, v = (torch.randn(args.batch, args.heads, total, args.head_dim, device=device, dtype=dtype)
                   for _ in range(3))
        backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION] if device.type == "cuda" else \
            [SDPBackend.FLASH_ATTENTION]

        def step(backward: bool):
            with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]), sdpa_kernel(backends):
                leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
                out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=causal)
                if backward:
                    out.sum().backward()

        fwd = median_time(lambda: step(False), device, args.iters, args.warmup)
        fwd_bwd = median_time(lambda: step(True), device, args.iters, args.warmup)
        return (fwd, fwd_bwd), "ok"
    except Exception as exc:  # report why PyTorch's path did not run, keep measuring ours
        return None, f"failed: {type(exc).__name__}: {str(exc)[:160]}"


def measure(args, device, dtype, rank, world, meshes):
    rows = []
    kernel = select_backend(Features(device.type, dtype, args.head_dim), args.backend)
    for seqlen_local in args.seqlens:
        shape_q = (args.batch, seqlen_local, args.heads, args.head_dim)
        shape_k = (args.batch, seqlen_local, args.heads_k, args.head_dim)
        q, k, v = (torch.randn(s, device=device, dtype=dtype, requires_grad=True) for s in (shape_q, shape_k, shape_k))
        dout = torch.randn(shape_q, device=device, dtype=dtype)
        # The ideal's rate: P back-to-back full-block calls of the best kernel, no merge.
        blocks = [torch.randn(shape_k, device=device, dtype=dtype) for _ in range(2)]
        scale = args.head_dim ** -0.5

        def ideal_calls():
            for step in range(world):
                kernel.forward(q.detach(), blocks[step % 2], blocks[step % 2], scale=scale)
        t_blocks = median_time(ideal_calls, device, args.iters, args.warmup)
        block_flops = attention_flops(seqlen_local, seqlen_local, args.heads, args.head_dim, args.batch, 1.0)
        rate = world * block_flops / t_blocks
        for variant in args.variants:
            layout, causal, exchange = VARIANTS[variant]
            ring = RingComm()

            def run(backward: bool, comm=None):
                for t in (q, k, v):
                    t.grad = None
                out, _ = attention(variant, q, k, v, args, meshes, comm)
                if backward:
                    out.backward(dout)

            kv = torch.stack((k.detach(), v.detach()))
            kv_recv = torch.empty_like(kv)
            dkv = torch.empty(kv.shape, dtype=torch.float32, device=device)
            dkv_recv = torch.empty_like(dkv)

            def comm_only(backward: bool):
                for _ in range(world - 1):
                    ring.exchange(kv, kv_recv).wait()
                if backward:
                    for _ in range(world - 1):
                        ring.exchange(kv, kv_recv).wait()
                    for _ in range(world):
                        ring.exchange(dkv, dkv_recv).wait()

            if device.type != "cpu":
                getattr(torch, device.type).reset_peak_memory_stats()
            result = dict(variant=variant, seqlen_local=seqlen_local, world=world)
            if exchange in meshes:
                result["mesh"] = f"{meshes[exchange].ulysses_size}x{meshes[exchange].ring_size}"
            for mode, backward in (("fwd", False), ("fwd_bwd", True)):
                both = median_time(lambda: run(backward), device, args.iters, args.warmup)
                ideal = rank_flops(variant, world, seqlen_local, args) * (3.5 if backward else 1.0) / rate
                result[f"{mode}_ms"] = both * 1e3
                result[f"{mode}_efficiency"] = ideal / both
                if exchange == "ring":
                    compute = median_time(lambda: run(backward, ComputeOnlyComm(ring)), device, args.iters,
                                          args.warmup)
                    comm = median_time(lambda: comm_only(backward), device, args.iters, args.warmup)
                    result[f"{mode}_compute_ms"], result[f"{mode}_comm_ms"] = compute * 1e3, comm * 1e3
                    result[f"{mode}_comm_hidden"] = (comm + compute - both) / comm if comm > 0 else 1.0
            if device.type != "cpu":
                result["peak_mem_gib"] = getattr(torch, device.type).max_memory_allocated() / 2 ** 30
            if args.torch_cp and exchange == "ring" and layout != "stripe":
                times, status = torch_context_parallel_time(args, device, dtype, seqlen_local, causal, world)
                result["torch_cp"] = status
                if times:
                    result["torch_cp_fwd_ms"], result["torch_cp_fwd_bwd_ms"] = times[0] * 1e3, times[1] * 1e3
                    result["speedup_vs_torch_cp_fwd_bwd"] = times[1] / (result["fwd_bwd_ms"] / 1e3)
            rows.append(result)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bfloat16 on GPUs, float32 on CPU")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--heads-k", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384], help="tokens per rank")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--backend", default=None)
    p.add_argument("--ulysses-size", type=int, default=None,
                   help="Ulysses degree of the usp variant (default 2 on an even world, else 1)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-torch-cp", dest="torch_cp", action="store_false")
    p.add_argument("--json", default=None, help="write the rows here (rank 0)")
    args = p.parse_args(argv)
    _, device = init_distributed(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[args.dtype or ("float32" if device.type == "cpu" else "bfloat16")]
    meshes = ulysses_meshes(args, world)
    worst = check_correctness(args, device, dtype, rank, world, meshes)
    rows = measure(args, device, dtype, rank, world, meshes)
    if rank == 0:
        print(f"ring_scaling: {world} ranks on {device.type}, {dtype}, batch {args.batch}, heads {args.heads}/"
              f"{args.heads_k}, head_dim {args.head_dim}, torch {torch.__version__}")
        print("correctness (max rel err vs float32 reference): "
              + ", ".join(f"{k}={v:.1e}" for k, v in worst.items()))
        header = ("variant", "S_local", "fwd ms", "fwd eff", "f+b ms", "f+b eff", "hidden f+b", "torch CP f+b ms")
        print(" | ".join(header))
        for r in rows:
            hidden = r.get("fwd_bwd_comm_hidden")
            name = r["variant"] + (f" {r['mesh']}" if "mesh" in r else "")
            print(" | ".join([name, str(r["seqlen_local"]), f"{r['fwd_ms']:.2f}", f"{r['fwd_efficiency']:.2f}",
                              f"{r['fwd_bwd_ms']:.2f}", f"{r['fwd_bwd_efficiency']:.2f}",
                              "-" if hidden is None else f"{hidden:.2f}",
                              f"{r['torch_cp_fwd_bwd_ms']:.2f}" if "torch_cp_fwd_bwd_ms" in r else r.get("torch_cp", "-")]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": device.type, "world": world, "dtype": str(dtype), "torch": torch.__version__,
                           "args": vars(args), "correctness": worst, "rows": rows}, f, indent=1)
    # Every rank past its last collective before any tears its groups down: on gloo a rank that destroys a
    # subgroup (the Ulysses meshes) while a peer still holds it can abort that peer.
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
