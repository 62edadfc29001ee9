"""Band masks on one device: the flex backend vs the triton backend vs the default backend on plain causal.

Issue 14's goal: a band-mask schedule (window (4096, 0) across blocks; softcap 50) forward+backward at
>= 0.8 of the default backend's TFLOP/s on the plain causal schedule, counting only the FLOPs the mask
leaves visible. Measured in one process, bf16, batch 1, 32 query / 8 K/V heads, head dim 128, P = 8:

* ``block``: one S x S block (S = S_local) with the band on its diagonal, through each backend's
  ``forward`` and ``forward`` + ``backward`` (the backward gets the block's own out/LSE, as in a ring of
  one). ``flex-native`` is compiled FlexAttention with its own backward (no recompute: what this
  backend's backward pays for taking the ring's global statistics). Baseline: the default backend
  (cuDNN on CUDA) on the plain causal block.
* ``ring``: rank 1's whole schedule (``ring`` layout: a sliding window needs no load balancing) through
  ``ring_attention`` over the loopback communicator (ring_flash_attn/comm/loopback.py: the other ranks'
  K/V blocks are handed over in memory, so no network is measured), forward and forward+backward
  (``torch.autograd.grad``). Baselines: the default backend on the plain causal ``zigzag`` schedule
  (how causal models are trained; the ratio is taken against it) and on the plain causal ``ring`` one.

Masks: ``window`` (causal, window (4096, 0)), ``softcap`` (plain causal, softcap 50) and
``window+softcap``. TFLOP/s = 4 * B * H * D * visible pairs / time for the forward, 3.5 times that for
forward+backward (the backward does 2.5 forwards' work; a recompute the backend adds is not counted).
A candidate that fails (or cannot serve a mask) is recorded with its error and the run continues.

    python benchmarks/band_mask.py --out benchmarks/results/band_mask_h200.json
    python benchmarks/band_mask.py --seqlens 4096 --masks window --reps 5      # a quicker look

Prints one JSON line at the end (and progress on stderr); writes the same JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ring_flash_attn import ring_attention  # noqa: E402
from ring_flash_attn.bench import Timer, environment  # noqa: E402
from ring_flash_attn.comm.loopback import LoopbackComm  # noqa: E402
from ring_flash_attn.kernels import Features, get_backend, select_backend  # noqa: E402
from ring_flash_attn.kernels.mask import Band  # noqa: E402
from ring_flash_attn.ring.layouts import get_layout  # noqa: E402

RANK = 1  # in the ring layout every rank but 0 has the same windowed work
MASKS = {"window": dict(causal=True, window=(4096, 0), softcap=0.0),
         "softcap": dict(causal=True, window=(-1, -1), softcap=50.0),
         "window+softcap": dict(causal=True, window=(4096, 0), softcap=50.0)}
PLAIN_CAUSAL = dict(causal=True, window=(-1, -1), softcap=0.0)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median_ms(fn, device, warmup: int, reps: int) -> float:
    """Median time of ``fn`` in ms: CUDA events on a GPU, the wall clock elsewhere."""
    return Timer(device).median_ms(fn, warmup, reps)


def visible_pairs(query_positions: torch.Tensor, num_keys: int, causal: bool, window) -> int:
    """(query, key) pairs the band leaves visible, queries at ``query_positions``, keys at 0 .. num_keys-1."""
    band = Band.from_kernel_args(causal, tuple(window))
    t = query_positions.long()
    last = t - band.lo if band.lo is not None else torch.full_like(t, num_keys - 1)
    first = t - band.hi if band.hi is not None else torch.zeros_like(t)
    return int((last.clamp(max=num_keys - 1) - first.clamp(min=0) + 1).clamp(min=0).sum())


def tflops(pairs: int, heads: int, head_dim: int, batch: int, ms: float, backward: bool) -> float:
    return (3.5 if backward else 1.0) * 4 * batch * heads * head_dim * pairs / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------------------------
# candidates: each returns (forward, forward+backward) closures


def block_calls(backend_name, q, k, v, dout, mask):
    backend = get_backend(backend_name)
    kw = dict(scale=q.shape[-1] ** -0.5, causal=mask["causal"], window=mask["window"], softcap=mask["softcap"])
    band = Band.from_kernel_args(mask["causal"], tuple(mask["window"]))
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    features = Features(q.device.type, q.dtype, q.shape[-1], softcap=bool(mask["softcap"]),
                        band=not (band.unbounded or band.is_top_left_causal(seqlen_q, seqlen_k)))
    reason = backend.unsupported_reason(features)
    if reason:
        raise NotImplementedError(f"backend {backend_name!r}: {reason}")

    def fwd():
        return backend.forward(q, k, v, **kw)

    def fwd_bwd():
        out, lse = backend.forward(q, k, v, **kw)
        return backend.backward(dout, q, k, v, out, lse, **kw)
    return fwd, fwd_bwd


def flex_native_calls(q, k, v, dout, mask):
    """Compiled FlexAttention with its own backward (autograd), K/V heads not repeated."""
    from ring_flash_attn.kernels.flex import FlexBackend

    flex = FlexBackend()
    band = Band.from_kernel_args(mask["causal"], tuple(mask["window"]))
    scale = q.shape[-1] ** -0.5
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def fwd():
        with torch.no_grad():
            return flex._attend(q, k, v, band, scale, mask["softcap"])

    def fwd_bwd():
        out, _ = flex._attend(*leaves, band, scale, mask["softcap"])
        return torch.autograd.grad(out, leaves, dout)
    return fwd, fwd_bwd


def ring_calls(backend_name, layout_name, world_size, q, kv_by_rank, dout, mask):
    """Rank RANK's whole schedule through ring_attention over the loopback; ``backend_name=None``: the default."""
    comm = LoopbackComm(RANK, kv_by_rank)
    kw = dict(variant=layout_name, causal=mask["causal"], window_size=mask["window"], softcap=mask["softcap"],
              backend=backend_name, comm=comm)
    leaves = [q.detach().requires_grad_(), kv_by_rank[RANK][0].detach().requires_grad_(),
              kv_by_rank[RANK][1].detach().requires_grad_()]

    def fwd():
        with torch.no_grad():
            return ring_attention(q, kv_by_rank[RANK][0], kv_by_rank[RANK][1], **kw)

    def fwd_bwd():
        out, _ = ring_attention(*leaves, **kw)
        return torch.autograd.grad(out, leaves, dout)
    return fwd, fwd_bwd


# ----------------------------------------------------------------------------------------------


def measure(row: dict, make_calls, pairs: int, args, device) -> dict:
    """Time one candidate into ``row``; a failure is recorded and printed, never raised."""
    t0 = time.perf_counter()
    try:
        fwd, fwd_bwd = make_calls()
        fwd_bwd()  # compiles and autotunes outside the timing, and fails early
        row["fwd_ms"] = median_ms(fwd, device, args.warmup, args.reps)
        row["fwd_bwd_ms"] = median_ms(fwd_bwd, device, args.warmup, args.reps)
        row["fwd_tflops"] = tflops(pairs, args.heads, args.head_dim, args.batch, row["fwd_ms"], False)
        row["fwd_bwd_tflops"] = tflops(pairs, args.heads, args.head_dim, args.batch, row["fwd_bwd_ms"], True)
    except Exception as exc:  # noqa: BLE001 - one candidate failing must not lose the others' figures
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["seconds"] = round(time.perf_counter() - t0, 1)
    figures = (f"fwd {row['fwd_tflops']:6.1f} TFLOP/s ({row['fwd_ms']:.3f} ms), fwd+bwd {row['fwd_bwd_tflops']:6.1f} "
               f"TFLOP/s ({row['fwd_bwd_ms']:.3f} ms)" if "fwd_bwd_tflops" in row else row["error"])
    log(f"{row['part']:5s} {row.get('layout', ''):6s} S={row['seqlen_local']:5d} {row['mask']:14s} "
        f"{row['candidate']:22s} {figures} [{row['seconds']} s]")
    return row


def add_ratios(rows, base) -> None:
    """``ratio_fwd`` / ``ratio_fwd_bwd``: TFLOP/s over ``base``'s, for the other rows that ran."""
    if "fwd_bwd_tflops" not in base:
        return
    for row in rows:
        if row is base or "fwd_bwd_tflops" not in row:
            continue
        row["baseline"] = base["candidate"] + (f" ({base['layout']})" if "layout" in base else "")
        row["ratio_fwd"] = row["fwd_tflops"] / base["fwd_tflops"]
        row["ratio_fwd_bwd"] = row["fwd_bwd_tflops"] / base["fwd_bwd_tflops"]


def block_rows(args, seqlen, device, dtype) -> list:
    """One S x S block with the band on its diagonal; the baseline first."""
    b, h, hk, d = args.batch, args.heads, args.heads_k, args.head_dim
    q = torch.randn(b, seqlen, h, d, device=device, dtype=dtype)
    k, v = (torch.randn(b, seqlen, hk, d, device=device, dtype=dtype) for _ in range(2))
    dout = torch.randn_like(q)
    positions = torch.arange(seqlen)
    pairs = visible_pairs(positions, seqlen, True, (-1, -1))
    rows = [measure(dict(part="block", seqlen_local=seqlen, mask="plain causal", candidate="default (sdpa)",
                         visible_pairs=pairs), partial(block_calls, "sdpa", q, k, v, dout, PLAIN_CAUSAL),
                    pairs, args, device)]
    for mask_name in args.masks:
        mask = MASKS[mask_name]
        pairs = visible_pairs(positions, seqlen, mask["causal"], mask["window"])
        for candidate in args.candidates + (["flex-native"] if "flex" in args.candidates else []):
            make = (partial(flex_native_calls, q, k, v, dout, mask) if candidate == "flex-native"
                    else partial(block_calls, candidate, q, k, v, dout, mask))
            rows.append(measure(dict(part="block", seqlen_local=seqlen, mask=mask_name, candidate=candidate,
                                     visible_pairs=pairs), make, pairs, args, device))
    add_ratios(rows, rows[0])
    return rows


def ring_rows(args, seqlen, device, dtype) -> list:
    """Rank RANK's whole schedule over the loopback; the baseline (plain causal zigzag) first."""
    b, h, hk, d, world_size = args.batch, args.heads, args.heads_k, args.head_dim, args.world_size
    q = torch.randn(b, seqlen, h, d, device=device, dtype=dtype)
    dout = torch.randn_like(q)
    kv_by_rank = [torch.randn(2, b, seqlen, hk, d, device=device, dtype=dtype) for _ in range(world_size)]
    rows = []
    for layout_name in ("zigzag", "ring"):
        pairs = visible_pairs(get_layout(layout_name).positions(RANK, world_size, seqlen), world_size * seqlen,
                              True, (-1, -1))
        rows.append(measure(dict(part="ring", layout=layout_name, world_size=world_size, seqlen_local=seqlen,
                                 mask="plain causal", candidate="default", visible_pairs=pairs),
                            partial(ring_calls, None, layout_name, world_size, q, kv_by_rank, dout, PLAIN_CAUSAL),
                            pairs, args, device))
    for mask_name in args.masks:
        mask = MASKS[mask_name]
        pairs = visible_pairs(get_layout("ring").positions(RANK, world_size, seqlen), world_size * seqlen,
                              mask["causal"], mask["window"])
        for candidate in args.candidates:
            rows.append(measure(dict(part="ring", layout="ring", world_size=world_size, seqlen_local=seqlen,
                                     mask=mask_name, candidate=candidate, visible_pairs=pairs),
                                partial(ring_calls, candidate, "ring", world_size, q, kv_by_rank, dout, mask),
                                pairs, args, device))
    add_ratios(rows, rows[0])
    return rows


def run(args) -> tuple:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    default_for = {name: select_backend(Features(device.type, dtype, args.head_dim, band=True,
                                                 softcap=bool(m["softcap"]))).name for name, m in MASKS.items()}
    log(f"default backend per band mask: {default_for}")
    rows = []
    for seqlen in args.seqlens:
        torch.manual_seed(seqlen)
        for part in (block_rows, ring_rows):
            rows += part(args, seqlen, device, dtype)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows, default_for


def summary(rows) -> str:
    """Markdown table of every row (stderr): TFLOP/s and the ratio to the part's baseline."""
    lines = ["| part | layout | S_local | mask | candidate | fwd TFLOP/s | fwd+bwd TFLOP/s | ratio fwd | "
             "ratio fwd+bwd |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        figures = ([f"{r['fwd_tflops']:.1f}", f"{r['fwd_bwd_tflops']:.1f}"] if "fwd_bwd_tflops" in r
                   else [r["error"][:60], ""])
        ratios = [f"{r['ratio_fwd']:.3f}", f"{r['ratio_fwd_bwd']:.3f}"] if "ratio_fwd_bwd" in r else ["", ""]
        lines.append("| " + " | ".join([r["part"], r.get("layout", ""), str(r["seqlen_local"]), r["mask"],
                                         r["candidate"], *figures, *ratios]) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--heads-k", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[4096, 8192], help="tokens per rank (S_local)")
    parser.add_argument("--masks", nargs="+", default=list(MASKS), choices=list(MASKS))
    parser.add_argument("--candidates", nargs="+", default=["flex", "triton"], help="band-mask backends to time")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default=None, help="JSON file to write")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    rows, default_for = run(args)
    result = dict(benchmark="band_mask", env=environment(device), args=vars(args), rank=RANK,
                  masks={n: MASKS[n] for n in args.masks}, default_backend_for_band=default_for,
                  goal="ring rows: ratio_fwd_bwd >= 0.8 against the default backend's plain causal zigzag schedule",
                  seconds=round(time.perf_counter() - started, 1), rows=rows)
    print(summary(rows), file=sys.stderr, flush=True)
    line = json.dumps(result)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print(line, flush=True)
    return result


if __name__ == "__main__":
    main()
