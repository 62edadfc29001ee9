"""``ring-attn check``: ring attention against full attention on the ranks it is launched on.

The first thing to run on a new cluster. Every rank draws the same full
sequence (seed agreed through rank 0), runs each variant on its slice, and
compares output, LSE and gradients with full attention computed in float64 by
the reference kernel. Prints one line per (variant, rank) with the errors and
time, and returns non-zero if any error exceeds the dtype's tolerance.
"""

from __future__ import annotations

import time

from .cli_common import HelpFormatter

# torch and the library are imported when the check runs, not when `ring-attn --help` builds the parser.
DEFAULT_MIN_SEQLEN = 1024
TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}  # by --dtype
CHECKS = (("ring", False), ("ring", True), ("zigzag", True), ("stripe", True))


def _rel_err(x, ref):
    x, ref = x.double().cpu(), ref.double().cpu()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _agreed_seed(device) -> int:
    import torch
    import torch.distributed as dist

    seed = torch.randint(0, 2 ** 31 - 1, (1,), dtype=torch.int64).to(device)
    dist.broadcast(seed, src=0)
    return int(seed.item())


def default_seqlen(world_size: int) -> int:
    """The shortest length of at least DEFAULT_MIN_SEQLEN that every variant splits over ``world_size`` ranks
    (zigzag needs 2 x world size equal chunks): 1024 at 4 or 8 ranks, 1032 at 12."""
    unit = 2 * world_size
    return -(-DEFAULT_MIN_SEQLEN // unit) * unit


def run_check(args, device) -> int:
    import torch
    import torch.distributed as dist

    from .functional import ring_attention
    from .kernels import get_backend
    from .ring.layouts import get_layout

    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype)
    seqlen = default_seqlen(world) if args.seqlen is None else args.seqlen
    unit = 2 * world
    if seqlen < unit or seqlen % unit:
        raise SystemExit(f"--seqlen: must be a multiple of 2 x world size = {unit} (zigzag's chunks), got {seqlen}")
    g = torch.Generator().manual_seed(_agreed_seed(device))
    shape_q = (args.batch, seqlen, args.heads, args.head_dim)
    shape_k = (args.batch, seqlen, args.heads_k, args.head_dim)
    q, k, v, dout = (torch.randn(s, generator=g, dtype=torch.float64) for s in (shape_q, shape_k, shape_k, shape_q))
    scale = args.head_dim ** -0.5
    reference = get_backend("reference")
    failed = False
    lines = []
    tolerance = TOLERANCE[args.dtype] if args.rtol is None else args.rtol
    for variant, causal in CHECKS:
        if args.variants and variant not in args.variants:
            continue
        ref_out, ref_lse = reference.forward(q, k, v, scale=scale, causal=causal)
        ref_grads = reference.backward(dout, q, k, v, ref_out, ref_lse, scale=scale, causal=causal)
        layout = get_layout(variant)

        def local(x, dim=1):
            return layout.shard(x, rank, world, dim).to(device)

        ql, kl, vl = (local(t).to(dtype).requires_grad_() for t in (q, k, v))
        dout_local = local(dout).to(dtype)
        # One untimed call first: it opens the P2P connections and loads kernels.
        ring_attention(ql, kl, vl, variant=variant, causal=causal, backend=args.backend)[0].backward(dout_local)
        for t in (ql, kl, vl):
            t.grad = None
        dist.barrier()
        start = time.perf_counter()
        out, lse = ring_attention(ql, kl, vl, variant=variant, causal=causal, backend=args.backend)
        out.backward(dout_local)
        if device.type != "cpu":
            getattr(torch, device.type).synchronize()
        elapsed = time.perf_counter() - start
        errs = {"out": _rel_err(out, local(ref_out)), "lse": _rel_err(lse, local(ref_lse, dim=2)),
                "dq": _rel_err(ql.grad, local(ref_grads[0])), "dk": _rel_err(kl.grad, local(ref_grads[1])),
                "dv": _rel_err(vl.grad, local(ref_grads[2]))}
        ok = all(e <= tolerance for e in errs.values())
        failed |= not ok
        lines.append(f"{variant:7s} causal={str(causal):5s} rank {rank}/{world}  "
                     + "  ".join(f"{n}={e:.2e}" for n, e in errs.items())
                     + f"  time={elapsed * 1e3:8.1f} ms  {'OK' if ok else 'MISMATCH'}")
    gathered = [None] * world
    dist.all_gather_object(gathered, (lines, failed))
    if rank == 0:
        print(f"ring-attn check: {world} ranks, device {device.type}, {args.dtype}, batch {args.batch}, "
              f"seqlen {seqlen}, heads {args.heads}/{args.heads_k}, head_dim {args.head_dim}, "
              f"tolerance {tolerance:.0e} (relative, vs float64 full attention)")
        for rank_lines, _ in gathered:
            for line in rank_lines:
                print(line)
        any_failed = any(f for _, f in gathered)
        print("RESULT:", "MISMATCH" if any_failed else "all ranks match full attention")
    return int(any(f for _, f in gathered))


def add_check_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "check", help="compare ring attention with full attention on the launched ranks",
        description="Run every variant (ring causal and not, zigzag, stripe) on the ranks this command is\n"
                    "launched on (torchrun, mpiexec, srun) and compare each rank's output, log-sum-exp and\n"
                    "gradients with full attention computed in float64. Prints one line per variant and rank\n"
                    "and exits non-zero if any error exceeds the tolerance. The first thing to run on a new\n"
                    "cluster; it works at any number of ranks with no arguments:\n\n"
                    "  torchrun --standalone --nproc_per_node 4 --no-python ring-attn check --device cpu\n"
                    "  mpiexec -n 12 ring-attn check",
        formatter_class=HelpFormatter)
    p.add_argument("--seqlen", type=int, default=None,
                   help=f"global sequence length, a multiple of 2 x ranks (default: the smallest such length "
                        f"of at least {DEFAULT_MIN_SEQLEN})")
    p.add_argument("--batch", type=int, default=1, help="sequences per batch")
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--heads-k", type=int, default=2, help="K/V heads (GQA); must divide --heads")
    p.add_argument("--head-dim", type=int, default=64, help="dimension of each head")
    p.add_argument("--dtype", choices=sorted(TOLERANCE), default=None,
                   help="default: float32 on CPU, bfloat16 on accelerators")
    p.add_argument("--backend", default=None, help="kernel backend (default: automatic)")
    p.add_argument("--device", default=None, help="cpu, cuda or xpu (default: the accelerator if any)")
    p.add_argument("--variants", nargs="*", default=None, help="subset of: ring zigzag stripe")
    p.add_argument("--rtol", type=float, default=None,
                   help="relative error allowed (default by dtype: " + ", ".join(
                       f"{name} {rtol:.0e}" for name, rtol in TOLERANCE.items()) + ")")
    p.set_defaults(handler=main_check)


def main_check(args) -> int:
    import torch.distributed as dist

    from .comm.launch import init_distributed

    _, device = init_distributed(args.device)
    if args.dtype is None:
        args.dtype = "float32" if device.type == "cpu" else "bfloat16"
    try:
        failed = run_check(args, device)
        # Every rank leaves together: gloo aborts a rank whose peer tears the group down under it (seen:
        # "terminate called without an active exception" at exit, after a passing check).
        dist.barrier()
        return failed
    finally:
        dist.destroy_process_group()
