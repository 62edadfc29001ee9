"""Packed batches (issue 19): host planning time and time per call against the number of sequences.

Planning (no ranks, no tensors; process CPU time, the fastest of ``--reps``): one rank's planning for one
call, i.e. the all-ranks band answer (``layout_needs_band_mask``) and the calls of every ring step as the
engine makes them (``step_calls``: ``plan_step``'s blocks, small ones of one shape batched, for every
source), for rank P - 1 (the busiest under a causal mask), three ways:

* ``cold``     every plan cache emptied first: the first call of a fresh process;
* ``new batch`` a new packed layout (the same lengths in another order, as the next training batch brings)
               with the per-length plans of earlier batches still cached;
* ``new batch, varlen`` the same, for a backend with variable-length calls (``step_calls(varlen=True)``:
               what bf16 on CUDA takes, ring/batching.VarlenBatch);
* ``old``      the previous planner (kept in tests/test_planner.py as the oracle), up to ``--old-max-seqs``
               sequences (it is quadratic to cubic in the number of sequences).

Sequence lengths are drawn at random (seeded; local lengths 1..``--max-local`` times the layout's unit), so
most lengths are distinct, the hard case for per-length caching.

Time per call (``--calls``): ``zigzag_ring_flash_attn_varlen_func``'s own path (``ring_attention`` with
``cu_seqlens``: validation, planning, the ring engine), forward + backward, for rank P - 1 over the loopback
communicator (ring_flash_attn/comm/loopback.py: the K/V blocks of the other ranks, made locally), on
sequences of ``--call-seqlen`` tokens each; first call (planning included), repeated call, call on a new batch (the same lengths in another order,
as the next training step brings: per-length plans cached, the batch's calls and row indices made anew), and with
``--compare-unbatched`` the repeated call with the engine's batching of equal-shape calls
(ring/batching.py) and the document-masked calls (ring/documents.py, with ``--backend flex``) switched
off. Against it:
the same rank's queries over the same tokens as one sequence of the total length with a block-diagonal
(document) mask, in one call of PyTorch's fused attention (``--baseline sdpa``: a dense boolean mask;
``--baseline flex``: FlexAttention with a document block mask, compiled; GPU only, it has no CPU
backward), forward + backward.

    python benchmarks/packed_planning.py                       # CPU, the figures in benchmarks/RESULTS.md
    python benchmarks/packed_planning.py --device cuda --baseline flex --calls-max-seqs 4096
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import random
import sys
import time
from datetime import datetime, timezone

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ring_flash_attn.comm.loopback import LoopbackComm  # noqa: E402
from ring_flash_attn.functional import ring_attention  # noqa: E402
from ring_flash_attn.kernels.mask import Band  # noqa: E402
from ring_flash_attn import functional  # noqa: E402
from ring_flash_attn.ring import batching  # noqa: E402
from ring_flash_attn.ring.batching import step_calls  # noqa: E402
from ring_flash_attn.ring.layouts import LAYOUTS, PackedLayout, get_layout  # noqa: E402
from ring_flash_attn.ring.planner import clear_plan_caches, layout_needs_band_mask, plan_step  # noqa: E402


def plan_one_call(layout, world_size, band, plan, needs_band):
    """One rank's planning for one call: the all-ranks band answer and every step's calls; returns the calls."""
    total = sum(layout.seqlens_local)
    needs_band(layout, world_size, total, band)
    rank = world_size - 1
    return sum(len(plan(layout, rank, src, world_size, total, band)) for src in range(world_size))


def best_ms(fn, reps, before=lambda: None, clock=time.perf_counter):
    """Fastest of ``reps`` timings in ms (the machine may be shared: the minimum is the least disturbed)."""
    times = []
    for _ in range(reps):
        before()
        start = clock()
        fn()
        times.append((clock() - start) * 1e3)
    return min(times)


def host_ms(fn, reps, before=lambda: None):
    """Planning time as this process's CPU time (pure host work, one thread: on a shared machine the wall
    clock also counts the time other processes held the cores)."""
    return best_ms(fn, reps, before, clock=time.process_time)


def random_lengths(layout_name, count, max_local, seed):
    rng = random.Random(seed)
    unit = get_layout(layout_name).chunks_per_rank
    return tuple(unit * rng.randint(1, max_local) for _ in range(count))


def planning_rows(args):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_planner import old_layout_needs_band_mask, old_plan_step

    rows = []
    for name in args.layouts:
        for world_size in args.world_sizes:
            for window in args.windows:
                band = Band.from_kernel_args(True, (window, -1))
                for count in args.seqs:
                    lengths = random_lengths(name, count, args.max_local, seed=count * 7 + world_size)
                    layout = PackedLayout(get_layout(name), lengths)
                    # What the engine runs: the planner's blocks, batched (ring/batching.py).
                    blocks = plan_one_call(layout, world_size, band, plan_step, layout_needs_band_mask)
                    calls = plan_one_call(layout, world_size, band, step_calls, layout_needs_band_mask)
                    cold = host_ms(lambda: plan_one_call(layout, world_size, band, step_calls, layout_needs_band_mask),
                                   args.reps, before=clear_plan_caches)
                    shuffled = list(lengths)

                    def new_batch():
                        random.Random(len(shuffled)).shuffle(shuffled)
                        return PackedLayout(get_layout(name), tuple(shuffled))
                    batches = [new_batch() for _ in range(args.reps)]
                    warm = min(host_ms(lambda b=b: plan_one_call(b, world_size, band, step_calls,
                                                                 layout_needs_band_mask), 1) for b in batches)
                    # the same with a backend that serves variable-length calls (FlashAttention-2 on CUDA, bf16):
                    # a step's small unmasked blocks and causal squares become one call each
                    varlen_calls = functools.partial(step_calls, varlen=True)
                    varlen_warm = min(host_ms(lambda b=b: plan_one_call(b, world_size, band, varlen_calls,
                                                                        layout_needs_band_mask), 1) for b in batches)
                    varlen_count = plan_one_call(layout, world_size, band, varlen_calls, layout_needs_band_mask)
                    old = None
                    if count <= args.old_max_seqs:
                        old = host_ms(lambda: plan_one_call(layout, world_size, band, old_plan_step,
                                                            old_layout_needs_band_mask), 1)
                    row = dict(layout=name, world_size=world_size, window=window, sequences=count,
                               distinct_lengths=len(set(lengths)), blocks=blocks, calls=calls, cold_ms=cold,
                               new_batch_ms=warm, varlen_calls=varlen_count, new_batch_varlen_ms=varlen_warm,
                               old_ms=old)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


_compiled_flex = None


def document_baseline(kind, q, k, v, dout, q_doc, k_doc, q_pos, k_pos):
    """Forward + backward of one rank's queries ``[1, Sq, H, D]`` over every key ``[1, S, Hk, D]`` in one fused
    call, masked to "same document and not later" (causal, block-diagonal)."""
    global _compiled_flex
    qh, kh, vh = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    if kind == "sdpa":
        mask = (q_doc.view(-1, 1) == k_doc.view(1, -1)) & (q_pos.view(-1, 1) >= k_pos.view(1, -1))
        out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=True)
    else:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        block_mask = create_block_mask(lambda b, h, i, j: (q_doc[i] == k_doc[j]) & (q_pos[i] >= k_pos[j]), None,
                                       None, q_doc.numel(), k_doc.numel(), device=q.device)
        out = _compiled_flex(qh, kh, vh, block_mask=block_mask, enable_gqa=True)
    out.backward(dout.transpose(1, 2))


def call_rows(args):
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for world_size in args.world_sizes:
        for count in args.seqs:
            if count > args.calls_max_seqs:
                continue
            local = args.call_seqlen // world_size
            if args.call_max_seqlen:  # random lengths: multiples of the zigzag unit 2P, seeded
                rng = random.Random(count * 11 + world_size)
                lengths = tuple(2 * rng.randint(1, args.call_max_seqlen // (2 * world_size)) for _ in range(count))
            else:
                lengths = (local,) * count
            total_local = sum(lengths)
            g = torch.Generator(device="cpu").manual_seed(count + world_size)
            make = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
            q, dout = make(total_local, args.heads, args.head_dim), make(total_local, args.heads, args.head_dim)
            kv_by_rank = [make(2, 1, total_local, args.heads_k, args.head_dim) for _ in range(world_size)]
            rank = world_size - 1
            cu_of = lambda ls: torch.tensor([0, *itertools.accumulate(ls)], dtype=torch.int32)  # noqa: E731
            cu = cu_of(lengths)

            def ring_call(cu_seqlens=cu):
                comm = LoopbackComm(rank, kv_by_rank)
                qq = q.detach().requires_grad_()
                out, _ = ring_attention(qq, kv_by_rank[rank][0, 0], kv_by_rank[rank][1, 0], variant="zigzag",
                                        causal=True, cu_seqlens=cu_seqlens, comm=comm, backend=args.backend)
                out.backward(dout)
                sync()

            clear_plan_caches()
            first = best_ms(ring_call, 1)
            repeated = best_ms(ring_call, args.reps)
            # A new packed batch, as each training step brings: the same lengths in another order (plans of
            # each length cached, the batch's own calls and row indices made anew).
            shuffled = list(lengths)
            new_batches = []
            for rep in range(args.reps):
                random.Random(rep).shuffle(shuffled)
                new_batches.append(cu_of(shuffled))
            new_batch = min(best_ms(lambda c=c: ring_call(c), 1) for c in new_batches)
            unbatched = None
            if args.compare_unbatched and count <= args.unbatched_max_seqs:
                saved = batching.MAX_BATCHED_ROWS, functional.MIN_DOCUMENTS
                batching.MAX_BATCHED_ROWS, functional.MIN_DOCUMENTS = 0, float("inf")
                try:
                    clear_plan_caches()
                    ring_call()  # planning
                    unbatched = best_ms(ring_call, args.reps)
                finally:
                    batching.MAX_BATCHED_ROWS, functional.MIN_DOCUMENTS = saved
                    clear_plan_caches()
            base_ms = None
            if args.baseline:
                # the same tokens as one sequence: every rank's keys in position order, documents of
                # --call-seqlen tokens
                layout = PackedLayout(get_layout("zigzag"), lengths)
                positions = torch.cat([layout.positions(r, world_size, total_local) for r in range(world_size)])
                order = torch.argsort(positions)
                k_all, v_all = (torch.cat([kv[part] for kv in kv_by_rank], dim=1)[:, order] for part in (0, 1))
                q_pos = layout.positions(rank, world_size, total_local).to(device)
                k_pos = positions[order].to(device)
                # a token's document: the packed sequence whose global range holds its position
                bounds = torch.tensor([0, *itertools.accumulate(world_size * n for n in lengths)], device=device)
                q_doc, k_doc = (torch.searchsorted(bounds, pos, right=True) - 1 for pos in (q_pos, k_pos))
                args_ = (q.unsqueeze(0), k_all, v_all, dout.unsqueeze(0), q_doc, k_doc, q_pos, k_pos)

                def baseline_call():
                    document_baseline(args.baseline, *args_)
                    sync()
                baseline_call()  # compiles FlexAttention
                base_ms = best_ms(baseline_call, args.reps)
            row = dict(world_size=world_size, sequences=count, distinct_lengths=len(set(lengths)),
                       seqlen=None if args.call_max_seqlen else args.call_seqlen, local_tokens=total_local,
                       first_call_ms=first, repeated_call_ms=repeated, new_batch_call_ms=new_batch,
                       unbatched_call_ms=unbatched,
                       baseline=args.baseline, baseline_ms=base_ms)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", default=sorted(LAYOUTS), choices=sorted(LAYOUTS))
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--seqs", nargs="+", type=int, default=[16, 64, 256, 1024, 4096],
                        help="numbers of packed sequences (default: %(default)s)")
    parser.add_argument("--windows", nargs="+", type=int, default=[-1, 64],
                        help="left windows of the causal mask, -1 = none (default: %(default)s)")
    parser.add_argument("--max-local", type=int, default=256,
                        help="planning: largest local length in units of the layout (default: %(default)s)")
    parser.add_argument("--old-max-seqs", type=int, default=64,
                        help="time the previous planner up to this many sequences (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=3, help="timings per point; the fastest is kept")
    parser.add_argument("--no-planning", action="store_true", help="skip the planning table")
    parser.add_argument("--calls", action="store_true", help="also time calls over the loopback communicator")
    parser.add_argument("--calls-max-seqs", type=int, default=256,
                        help="time calls up to this many sequences (default: %(default)s)")
    parser.add_argument("--compare-unbatched", action="store_true",
                        help="calls: also time the repeated call with the engine's batching of equal-shape calls "
                             "and its document-masked calls off (every block its own kernel call, as before)")
    parser.add_argument("--unbatched-max-seqs", type=int, default=1024,
                        help="--compare-unbatched up to this many sequences (default: %(default)s)")
    parser.add_argument("--call-seqlen", type=int, default=16, help="tokens per sequence in the calls (global)")
    parser.add_argument("--call-max-seqlen", type=int, default=None,
                        help="calls: random sequence lengths (global, multiples of 2P) up to this instead of "
                             "--call-seqlen each")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--backend", default=None, help="kernel backend of the ring calls (default: automatic)")
    parser.add_argument("--baseline", choices=["sdpa", "flex"], default=None,
                        help="one-sequence block-diagonal baseline for the calls (default: none)")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--heads-k", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--out", default=None, help="write the rows and the environment as JSON here")
    args = parser.parse_args(argv)
    if args.baseline == "flex" and args.device == "cpu":
        parser.error("--baseline flex: FlexAttention has no backward on the CPU (torch 2.13); use --device cuda")
    torch.set_num_threads(1)  # planning is one thread; tiny tensor ops gain nothing from more
    env = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
               processor=platform.processor(), cpus=os.cpu_count(), device=args.device,
               date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if args.device.startswith("cuda"):
        env["device_name"] = torch.cuda.get_device_name()
    print(json.dumps(env), flush=True)
    result = dict(environment=env, args=vars(args))
    if not args.no_planning:
        result["planning"] = planning_rows(args)
    if args.calls:
        result["calls"] = call_rows(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
