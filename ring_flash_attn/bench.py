"""One rank's whole ring schedule on one device, against the ideal, in one run.

For each world size P and local length S, the ring engine runs rank ``RANK``'s
schedule unchanged, over a loopback communicator (ring_flash_attn/comm/loopback.py)
that hands it the K/V blocks the other ranks would send. Timed, forward and
forward+backward:

* ``ideal``      the per-step kernel calls the schedule needs (the planner's tasks),
                 back to back, through the best library kernel with no merge and no
                 ring: cuDNN on CUDA, PyTorch's flash op on the CPU. Timed two ways,
                 K/V as a ring delivers them (cuDNN takes GQA natively) and K/V heads
                 repeated beforehand outside the timing; the ideal is the faster.
                 Efficiency = t(ideal) / t(variant), same process, same inputs,
                 timed in interleaved rounds.
* ``sdpa-eager`` the engine with the sdpa backend and the eager LSE merge: the baseline.
* ``sdpa-fused`` the engine with the sdpa backend and the one-pass Triton merge (default).
* ``triton``     the engine with the Triton kernels (merge folded into the forward).
* ``sdpa-fused-graph`` (``--graph``, CUDA) sdpa-fused captured in CUDA graphs and replayed: the
                 same kernels with no host work per step.
* ``sdpa-nomerge`` the sdpa backend's own calls back to back, no merge (isolates
                 the backend's GQA repeat from the merge).

Peak memory is compared with the schedule's minimum: Q, K, V, out (+LSE), two K/V
buffers and the float32 accumulators; for the backward also dout, dQ/dK/dV, the
float32 dQ accumulator and two float32 dK/dV buffers.

    ring-attn bench --out-dir bench_out          # the accelerator, the issue's sizes
    ring-attn bench --out-dir bench_out --device cpu --seqlens 256 --world-sizes 2 4 --heads 4 --heads-k 2

(``python benchmarks/ring_step.py`` runs the same from a checkout, writing to its benchmarks/results by
default.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

from tqdm import tqdm

from .cli_common import HelpFormatter
from .comm.backend import default_device_type
from .comm.loopback import LoopbackComm
from .kernels import available_backends, get_backend
from .kernels.base import repeat_kv
from .kernels.mask import Band
from .kernels.sdpa import SdpaBackend
from .merge import merge_into_eager
from .ring import RingPlan, get_layout, plan_step, ring_backward, ring_forward

DESCRIPTION = """\
Time one rank's whole ring schedule on one device, forward and forward+backward, against the ideal: the
same kernel calls back to back through the best library kernel (cuDNN on NVIDIA GPUs, PyTorch's flash op
elsewhere) with no merge and no communication. The other ranks' K/V blocks are handed over in memory, so
only the schedule, the kernels and the merge are measured, not the network.

Efficiency = ideal time / measured time, both timed in the same process in interleaved rounds. A value
above 1 (marked *) means the two differed by less than the timing noise, not that the schedule beat the
ideal. Peak memory is given as a ratio to the schedule's minimum. Results go to --out-dir as JSON and a plot.

Examples:
  ring-attn bench --out-dir bench_out    # the accelerator, 2/4/8 ranks, 4k-16k tokens per rank
  ring-attn bench --out-dir bench_out --device cpu --seqlens 256 --world-sizes 2 4 --heads 4 --heads-k 2
"""
NOISE_NOTE = "* above 1: the schedule and the ideal differed by less than the timing noise"

RANK = 1  # a rank whose zigzag schedule has steps of both kinds (earlier and later sources)
SCHEDULES = {"ring": False, "zigzag": True}  # layout -> causal
aten = torch.ops.aten


class EagerMergeSdpa(SdpaBackend):
    """The baseline: sdpa's kernels, then the eager merge (what existing ring implementations do)."""

    name = "sdpa-eager"

    def forward_accumulate(self, q, k, v, out_acc, lse_acc, **kw):
        out, lse = self.forward(q, k, v, **kw)
        merge_into_eager(out_acc, lse_acc, out, lse)


# ----------------------------------------------------------------------------------------------
# timing


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def _once_ms(self, fn) -> tuple:
        """(device time, host time to enqueue) of one call, in ms: when the two are close, the
        device waited for the host (launch-bound) rather than the other way round."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            fn()
            host = (time.perf_counter() - t0) * 1e3
            end.record()
            end.synchronize()
            return start.elapsed_time(end), host
        t0 = time.perf_counter()
        fn()
        wall = (time.perf_counter() - t0) * 1e3
        return wall, wall

    def median_ms(self, fn, warmup: int = 3, reps: int = 20) -> float:
        """Median device time of ``fn`` in ms (CUDA events on a GPU, the wall clock elsewhere)."""
        for _ in range(warmup):
            fn()
        self.sync()
        return statistics.median(self._once_ms(fn)[0] for _ in range(reps))

    def interleaved_ms(self, fns: dict, warmup: int, rounds: int, reps: int) -> tuple:
        """Per function of ``fns``: (median, min, max) device ms, and median host ms, timed in turns.

        Each round times every function ``reps`` times, so clock drift between
        the ideal and the variants (seen as +-5 % between separate loops) hits
        all of them alike.
        """
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        self.sync()
        times = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                times[name] += [self._once_ms(fn) for _ in range(reps)]
        device = {name: (statistics.median(t[0] for t in ts), min(t[0] for t in ts), max(t[0] for t in ts))
                  for name, ts in times.items()}
        host = {name: statistics.median(t[1] for t in ts) for name, ts in times.items()}
        return device, host

    def peak_bytes(self, fn) -> int | None:
        """Bytes allocated at the peak of ``fn`` beyond what was allocated before it."""
        if not self.cuda:
            return None
        self.sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        self.sync()
        return torch.cuda.max_memory_allocated() - base


# ----------------------------------------------------------------------------------------------
# the ideal: the schedule's kernel calls, back to back, best library kernel, no merge


def make_ideal(tasks, q, kv_by_src, scale, device, repeated: bool):
    """(forward, forward+backward) closures over the schedule's kernel calls with no merge and no ring.

    ``tasks[step]`` are the planner's arguments for that step. ``repeated``: K/V heads
    repeated for GQA beforehand, outside the timing; else the kernel takes K/V as
    a ring delivers them (cuDNN takes GQA natively; the CPU op does not).
    """
    world_size = len(kv_by_src)
    groups = q.shape[2] // kv_by_src[0].shape[3]
    calls = []
    for step in range(world_size):
        kv = kv_by_src[(RANK - step) % world_size]
        if repeated or device.type != "cuda":
            kv = torch.stack([repeat_kv(kv[i], groups) for i in (0, 1)])
        for task in plan_step(*tasks[step]):
            calls.append((q[:, task.q].transpose(1, 2), kv[0][:, task.k].transpose(1, 2),
                          kv[1][:, task.k].transpose(1, 2), task.kernel_mask_args()["causal"]))
    if device.type != "cuda":
        def fwd_cpu():
            for qh, kh, vh, causal in calls:
                aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, 0.0, causal, scale=scale)

        def fwd_bwd_cpu():
            for qh, kh, vh, causal in calls:
                out, lse = aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, 0.0, causal, scale=scale)
                aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    out, qh, kh, vh, out, lse, 0.0, causal, scale=scale)
        return fwd_cpu, fwd_bwd_cpu

    saved = []
    for qh, kh, vh, causal in calls:
        out, lse = aten._scaled_dot_product_cudnn_attention(qh, kh, vh, None, True, 0.0, causal, False,
                                                            scale=scale)[:2]
        saved.append((out, lse, torch.randn_like(out)))
    seed = torch.zeros((), dtype=torch.int64, device=device)

    def fwd():
        for qh, kh, vh, causal in calls:
            aten._scaled_dot_product_cudnn_attention(qh, kh, vh, None, True, 0.0, causal, False, scale=scale)

    def fwd_bwd():
        fwd()
        for (qh, kh, vh, causal), (out, lse, dout) in zip(calls, saved):
            aten._scaled_dot_product_cudnn_attention_backward(
                dout, qh, kh, vh, out, lse, seed, seed, None, None, None, qh.shape[2], kh.shape[2], 0.0, causal,
                scale=scale)
    return fwd, fwd_bwd


# ----------------------------------------------------------------------------------------------
# the engine over the loopback


def make_engine(backend, layout, causal, q, dout, kv_by_rank, scale, backward_head_chunks=1):
    comm = LoopbackComm(RANK, kv_by_rank)
    plan = RingPlan(layout=layout, band=Band.from_kernel_args(causal, (-1, -1)), scale=scale, softcap=0.0,
                    backend=backend, comm=comm, backward_head_chunks=backward_head_chunks)
    k, v = kv_by_rank[RANK][0], kv_by_rank[RANK][1]

    def fwd():
        return ring_forward(q, k, v, plan)

    def fwd_bwd():
        out, lse = ring_forward(q, k, v, plan)
        return ring_backward(dout, q, k, v, out, lse, plan)
    return fwd, fwd_bwd


def graphed(fn, warmup: int = 3):
    """``fn`` (no arguments, static tensors) captured in a CUDA graph; returns the graph's replay.

    Replaying launches every kernel of the schedule with no Python per step, so the host time per call is the
    replay's: how far capturing takes the host-bound small steps. Warm-up calls on a side stream first (Triton's
    autotuning, cuDNN's plans and the planner's caches are made outside the capture).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def make_backend_calls(backend, tasks, q, kv_by_src, scale):
    """The backend's own forward calls for the schedule, back to back, no merge."""
    world_size = len(kv_by_src)
    calls = []
    for step in range(world_size):
        src = (RANK - step) % world_size
        for task in plan_step(*tasks[step]):
            calls.append((q[:, task.q], kv_by_src[src][0][:, task.k], kv_by_src[src][1][:, task.k],
                          task.kernel_mask_args()))

    def fwd():
        for qq, kk, vv, args in calls:
            backend.forward(qq, kk, vv, scale=scale, **args)
    return fwd


# ----------------------------------------------------------------------------------------------


def minimum_bytes(b, s, h, hk, d, elem):
    """The schedule's least memory, forward and forward+backward (see the module docstring)."""
    q = b * s * h * d
    kv = b * s * hk * d
    lse = b * h * s * 4
    fwd = (q + 2 * kv + q + 2 * 2 * kv) * elem + q * 4 + lse
    bwd = (q + 2 * kv + q + q + 2 * 2 * kv + q + 2 * kv) * elem + lse + q * 4 + 2 * 2 * kv * 4
    return fwd, max(fwd, bwd)


# The variant that is the library's default on CUDA (its TFLOP/s and host time go into the table).
DEFAULT = "sdpa-fused"
# The default captured in CUDA graphs (forward, forward+backward), replayed (--graph).
GRAPHED = "sdpa-fused-graph"


def visible_pairs(tasks) -> int:
    """(query, key) pairs the schedule's kernel calls compute, over all steps (what the FLOPs count)."""
    pairs = 0
    for task_args in tasks:
        for task in plan_step(*task_args):
            q_len, k_len = task.q_stop - task.q_start, task.k_stop - task.k_start
            pairs += q_len * k_len if task.band is None else int(task.band.dense(q_len, k_len).sum())
    return pairs


def run(args):
    device = torch.device(args.device)
    timer = Timer(device)
    dtype = getattr(torch, args.dtype)
    scale = args.head_dim ** -0.5
    variants = {"sdpa-eager": EagerMergeSdpa(), "sdpa-fused": get_backend("sdpa")}
    if "triton" in available_backends() and device.type != "cpu":
        variants["triton"] = get_backend("triton")
    if device.type == "cuda" and args.graph:
        variants[GRAPHED] = get_backend("sdpa")
    rows = []
    points = [(s, p, n) for s in args.schedules for p in args.world_sizes for n in args.seqlens]
    progress = tqdm(points, desc="ring-attn bench", unit="point", file=sys.stderr)
    for schedule, world_size, seqlen in progress:
        causal = SCHEDULES[schedule]
        layout = get_layout(schedule)
        progress.set_postfix(schedule=schedule, P=world_size, S_local=seqlen)
        torch.manual_seed(seqlen * 31 + world_size)
        b, h, hk, d = args.batch, args.heads, args.heads_k, args.head_dim
        q = torch.randn(b, seqlen, h, d, device=device, dtype=dtype)
        dout = torch.randn_like(q)
        kv_by_rank = [torch.randn(2, b, seqlen, hk, d, device=device, dtype=dtype)
                      for _ in range(world_size)]
        band = Band.from_kernel_args(causal, (-1, -1))
        tasks = [(layout, RANK, (RANK - step) % world_size, world_size, seqlen, band)
                 for step in range(world_size)]
        row = dict(schedule=schedule, causal=causal, world_size=world_size, seqlen_local=seqlen,
                   calls=sum(len(plan_step(*t)) for t in tasks))
        # FLOPs of the schedule: 4 b h d per visible (query, key) pair forward, 2.5x that backward
        fwd_flops = 4 * b * h * d * visible_pairs(tasks)
        flops = {"fwd": fwd_flops, "fwd_bwd": 3.5 * fwd_flops}
        native, repeated = (make_ideal(tasks, q, kv_by_rank, scale, device, rep) for rep in (False, True))
        engines = {name: make_engine(backend, layout, causal, q, dout, kv_by_rank, scale, args.backward_head_chunks)
                   for name, backend in variants.items() if name != GRAPHED}
        if GRAPHED in variants:
            engines[GRAPHED] = make_engine(variants[GRAPHED], layout, causal, q, dout, kv_by_rank, scale,
                                           args.backward_head_chunks)
        for name, (fwd, fwd_bwd) in list(engines.items()):
            try:
                fwd_bwd()
                if name == GRAPHED:
                    engines[name] = (graphed(fwd), graphed(fwd_bwd))
            except RuntimeError as exc:  # one variant failing must not lose the others' figures
                row[f"{name}_error"] = str(exc).splitlines()[0][:300]
                print(f"{name}: {row[f'{name}_error']}", flush=True)
                del engines[name]
        fwd_fns = {"ideal-native": native[0], "ideal-repeated": repeated[0],
                   "sdpa-nomerge": make_backend_calls(variants["sdpa-fused"], tasks, q, kv_by_rank, scale),
                   **{name: fns[0] for name, fns in engines.items()}}
        fwd_bwd_fns = {"ideal-native": native[1], "ideal-repeated": repeated[1],
                       **{name: fns[1] for name, fns in engines.items()}}
        for mode, fns in (("fwd", fwd_fns), ("fwd_bwd", fwd_bwd_fns)):
            device_ms, host_ms = timer.interleaved_ms(fns, args.warmup, args.rounds, args.reps)
            for name in fns:
                row[f"{name}_{mode}_ms"] = device_ms[name]
                row[f"{name}_{mode}_host_ms"] = host_ms[name]
            # The ideal: the library kernel called the faster of its two ways, per schedule.
            row[f"ideal_{mode}_ms"] = min(row[f"ideal-native_{mode}_ms"], row[f"ideal-repeated_{mode}_ms"])
        del native, repeated
        min_fwd, min_fwd_bwd = minimum_bytes(b, seqlen, h, hk, d, q.element_size())
        # Inputs alive during the run: q, dout and this rank's K/V (the other ranks' blocks
        # stand in for the network and are not part of the schedule's memory).
        own_inputs = q.numel() * q.element_size() + kv_by_rank[RANK].numel() * q.element_size()
        for name in variants:
            if name not in engines:
                row[f"{name}_fwd_eff"] = row[f"{name}_fwd_bwd_eff"] = 0.0
                continue
            fwd, fwd_bwd = engines[name]
            # (a graph's memory is its own pool, allocated at capture: a replay allocates nothing to measure)
            peak_fwd, peak_fwd_bwd = (None, None) if name == GRAPHED else (timer.peak_bytes(fwd),
                                                                            timer.peak_bytes(fwd_bwd))
            if peak_fwd is not None:
                row[f"{name}_fwd_mem_ratio"] = (own_inputs + peak_fwd) / min_fwd
                row[f"{name}_fwd_bwd_mem_ratio"] = (own_inputs + dout.numel() * dout.element_size()
                                                    + peak_fwd_bwd) / min_fwd_bwd
            row[f"{name}_fwd_eff"] = row["ideal_fwd_ms"][0] / row[f"{name}_fwd_ms"][0]
            row[f"{name}_fwd_bwd_eff"] = row["ideal_fwd_bwd_ms"][0] / row[f"{name}_fwd_bwd_ms"][0]
        for name in ("ideal", *engines):
            for mode in ("fwd", "fwd_bwd"):
                row[f"{name}_{mode}_tflops"] = flops[mode] / (row[f"{name}_{mode}_ms"][0] * 1e9)
        row["sdpa-nomerge_fwd_eff"] = row["ideal_fwd_ms"][0] / row["sdpa-nomerge_fwd_ms"][0]
        rows.append(row)
        progress.write(_line(row, variants))
        _write_json(args, rows)  # after every point: a run cut short by a time limit keeps what it measured
        del q, dout, kv_by_rank
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, list(variants)


def _line(row, variants):
    parts = [f"{row['schedule']:>6} P={row['world_size']} S={row['seqlen_local']:>5} "
             f"ideal fwd {row['ideal_fwd_ms'][0]:8.3f} ms, fwd+bwd {row['ideal_fwd_bwd_ms'][0]:8.3f} ms |"]
    for name in variants:
        mem = row.get(f"{name}_fwd_bwd_mem_ratio")
        parts.append(f"{name} {_eff(row[f'{name}_fwd_eff'])}/{_eff(row[f'{name}_fwd_bwd_eff'])}"
                     + (f" mem {row[f'{name}_fwd_mem_ratio']:.2f}/{mem:.2f}" if mem else ""))
    parts.append(f"sdpa-nomerge {_eff(row['sdpa-nomerge_fwd_eff'])} | ideal native/repeated fwd "
                 f"{row['ideal-native_fwd_ms'][0]:.3f}/{row['ideal-repeated_fwd_ms'][0]:.3f} ms | fwd host/device ms "
                 + " ".join(f"{n} {row[f'{n}_fwd_host_ms']:.2f}/{row[f'{n}_fwd_ms'][0]:.2f}"
                            for n in ("ideal-native", *variants) if f"{n}_fwd_host_ms" in row))
    return " ".join(parts)


def table(rows, variants) -> str:
    """Markdown: efficiency fwd / fwd+bwd and memory ratio fwd / fwd+bwd per variant."""
    head = "| schedule | P | S_local | ideal fwd ms | ideal fwd+bwd ms | " + " | ".join(
        f"{v} eff fwd / fwd+bwd | {v} mem fwd / fwd+bwd" for v in variants) + " | sdpa-nomerge eff fwd | " + \
        f"TFLOP/s per device fwd / fwd+bwd, ideal | {DEFAULT} | fwd host / device ms, {DEFAULT} |" + \
        (f" {GRAPHED} |" if GRAPHED in variants else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [r["schedule"], str(r["world_size"]), str(r["seqlen_local"]), f"{r['ideal_fwd_ms'][0]:.3f}",
                 f"{r['ideal_fwd_bwd_ms'][0]:.3f}"]
        for v in variants:
            cells.append(f"{_eff(r[f'{v}_fwd_eff'])} / {_eff(r[f'{v}_fwd_bwd_eff'])}")
            mem = r.get(f"{v}_fwd_mem_ratio")
            cells.append(f"{mem:.2f} / {r[f'{v}_fwd_bwd_mem_ratio']:.2f}" if mem else "n/a")
        cells.append(_eff(r['sdpa-nomerge_fwd_eff']))
        for name in ("ideal", DEFAULT):
            cells.append(f"{r.get(f'{name}_fwd_tflops', 0):.3g} / {r.get(f'{name}_fwd_bwd_tflops', 0):.3g}")
        for name in (DEFAULT, GRAPHED) if GRAPHED in variants else (DEFAULT,):
            cells.append(f"{r.get(f'{name}_fwd_host_ms', 0):.2f} / {r.get(f'{name}_fwd_ms', [0])[0]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    if any("*" in line for line in lines[2:]):
        lines.append("\n" + NOISE_NOTE)
    return "\n".join(lines)


def _eff(efficiency: float) -> str:
    """An efficiency for a table; one above 1 is flagged (see NOISE_NOTE)."""
    return f"{efficiency:.3f}" + ("*" if efficiency > 1 else "")


def plot(rows, variants, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedules = sorted({r["schedule"] for r in rows})
    fig, axes = plt.subplots(len(schedules), 2, figsize=(11, 4 * len(schedules)), squeeze=False)
    for i, schedule in enumerate(schedules):
        for j, mode in enumerate(("fwd", "fwd_bwd")):
            ax = axes[i][j]
            for v in variants:
                for p in sorted({r["world_size"] for r in rows}):
                    sel = [r for r in rows if r["schedule"] == schedule and r["world_size"] == p]
                    ax.plot([r["seqlen_local"] for r in sel], [r[f"{v}_{mode}_eff"] for r in sel], marker="o",
                            label=f"{v} P={p}")
            ax.axhline(0.95 if mode == "fwd" else 0.93, color="k", ls="--", lw=0.8, label="goal")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{schedule} ({'causal' if SCHEDULES[schedule] else 'non-causal'}), {mode.replace('_', '+')}")
            ax.set_xlabel("tokens per rank")
            ax.set_ylabel("ring efficiency = ideal / measured")
            ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def environment(device) -> dict:
    env = dict(torch=torch.__version__, python=platform.python_version(),
               date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=str(device))
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def _write_json(args, rows) -> dict:
    os.makedirs(args.out_dir, exist_ok=True)
    env = environment(torch.device(args.device))
    with open(os.path.join(args.out_dir, "ring_step.json"), "w") as f:
        json.dump(dict(environment=env, args=vars(args), rank=RANK, rows=rows), f, indent=1)
    return env


def main(argv=None, default_out_dir=None):
    """``ring-attn bench``: ``--out-dir`` is required (results go where the user says, never into whatever
    directory the command runs in); ``default_out_dir`` makes it optional (a checkout's benchmarks/ring_step.py
    writes to its benchmarks/results)."""
    parser = argparse.ArgumentParser(prog="ring-attn bench", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--device", default=None, help="cpu, cuda or xpu (default: the accelerator if any, else cpu)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "float64"],
                        help="data type of q, k, v")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES),
                        help="layouts to time: ring (non-causal), zigzag (causal)")
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[2, 4, 8],
                        help="ring sizes P to simulate (at least 2)")
    parser.add_argument("--seqlens", nargs="+", type=int, default=[4096, 8192, 16384],
                        help="tokens per rank (S_local)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per batch")
    parser.add_argument("--heads", type=int, default=32, help="query heads")
    parser.add_argument("--heads-k", type=int, default=8, help="K/V heads (GQA)")
    parser.add_argument("--head-dim", type=int, default=128, help="dimension of each head")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per candidate first")
    parser.add_argument("--rounds", type=int, default=3, help="turns in which every candidate is timed")
    parser.add_argument("--reps", type=int, default=3, help="timings per candidate per round")
    parser.add_argument("--backward-head-chunks", type=int, default=1,
                        help="the engine's backward calls on groups of K/V heads, this many per block (lower "
                             "peak memory, more launches; RING_FLASH_ATTN_BACKWARD_HEAD_CHUNKS in the library)")
    parser.add_argument("--graph", action="store_true",
                        help=f"CUDA: also time the default variant captured in CUDA graphs ({GRAPHED})")
    parser.add_argument("--out-dir", default=default_out_dir, required=default_out_dir is None, metavar="DIR",
                        help="where ring_step.json and ring_step.png are written (created if missing)")
    args = parser.parse_args(argv)
    args.device = args.device or default_device_type()
    if any(p < 2 for p in args.world_sizes):
        parser.error("--world-sizes: the loopback ring needs P >= 2")
    if args.backward_head_chunks < 1 or args.heads_k % args.backward_head_chunks:
        parser.error(f"--backward-head-chunks: expected a positive divisor of --heads-k {args.heads_k}, "
                     f"got {args.backward_head_chunks}")

    rows, variants = run(args)
    env = _write_json(args, rows)
    print(json.dumps(env))
    print(table(rows, variants))
    try:
        plot(rows, variants, os.path.join(args.out_dir, "ring_step.png"))
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    if not math.isfinite(sum(r["ideal_fwd_ms"][0] for r in rows)):
        sys.exit("non-finite timings")


if __name__ == "__main__":
    main()
