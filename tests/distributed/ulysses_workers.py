"""Ulysses / USP workers: every mesh of a 4-rank world runs the whole case matrix in one process group.

Meshes (ulysses x ring): 4x1 and 2x2 over all four ranks; 2x1 and 1x2 on two pairs of ranks side by side
(each pair solving the same problem); 1x1 on every rank alone, the world-size-1 error each mesh is compared
with.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from ring_flash_attn import RingAttention, ulysses_attention, usp_attention, usp_process_groups
from ring_flash_attn.ring.layouts import PackedLayout, get_layout
from tests.distributed.workers import DTYPES, _cumsum, alibi_slopes_for, make_inputs, oracle, packed_oracle
from tests.tolerances import rel_err

MESHES = ("1x1", "4x1", "2x2", "2x1", "1x2")  # ulysses x ring


def _meshes(rank):
    """{mesh: (attention(q, k, v, **kw), cp_rank, cp_size)}; 2x1 through ulysses_attention (ulysses_attention on
    the default group runs in the check after the bad inputs)."""
    pair = dist.new_group([0, 1] if rank < 2 else [2, 3], use_local_synchronization=True)
    usp_process_groups(2, timeout=timedelta(seconds=123))  # the first call makes the groups; later ones reuse them
    one = lambda **groups: lambda q, k, v, **kw: usp_attention(q, k, v, **groups, **kw)  # noqa: E731
    two_by_one = lambda q, k, v, **kw: ulysses_attention(q, k, v, group=pair, **kw)  # noqa: E731
    return {"1x1": (one(ulysses_group=None, ring_group=None), 0, 1),
            "4x1": (one(**usp_process_groups(4).attention_groups()), rank, 4),
            "2x2": (one(**usp_process_groups(2).attention_groups()), rank, 4),
            "2x1": (two_by_one, rank % 2, 2),
            "1x2": (one(**usp_process_groups(1, pair).attention_groups()), rank % 2, 2)}, pair


def _case_errors(case, ref, call, cp_rank, cp_size):
    """Relative errors of out, lse, dq, dk, dv on this rank's slice."""
    seqlens, window = case.get("seqlens"), tuple(case.get("window", (-1, -1)))
    q, k, v, dout = case["inputs"]
    if seqlens:
        local_lengths = tuple(n // cp_size for n in seqlens)
        layout = PackedLayout(get_layout(case["variant"]), local_lengths)
    else:
        layout = get_layout(case["variant"])
    local = lambda x, dim=1: layout.shard(x, cp_rank, cp_size, dim)  # noqa: E731
    dtype = DTYPES[case["dtype"]]
    ql, kl, vl = (local(t).to(dtype).requires_grad_() for t in (q, k, v))
    kw = dict(variant=case["variant"], causal=case["causal"], window_size=window, softcap=case.get("softcap", 0.0),
              backend=case["backend"], alibi_slopes=alibi_slopes_for(case))
    if seqlens:
        cu = torch.tensor(_cumsum(local_lengths), dtype=torch.int32)
        out, lse = call(ql[0], kl[0], vl[0], cu_seqlens=cu, **kw)
        out, lse = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        out, lse = call(ql, kl, vl, **kw)
    out.backward(local(dout).to(dtype))
    got = (out, lse, ql.grad, kl.grad, vl.grad)
    want = (local(ref[0]), local(ref[1], dim=2), local(ref[2]), local(ref[3]), local(ref[4]))
    return {name: rel_err(g, w) for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want)}


def _oracle_for(case):
    kw = dict(causal=case["causal"], window=tuple(case.get("window", (-1, -1))), scale=case["head_dim"] ** -0.5,
              softcap=case.get("softcap", 0.0), alibi_slopes=alibi_slopes_for(case))
    seqlens = case.get("seqlens")
    inputs = make_inputs(dict(case, seqlen=sum(seqlens)) if seqlens else case)
    return inputs, (packed_oracle(*inputs, seqlens, **kw) if seqlens else oracle(*inputs, **kw))


def _module_round_trip(rank, seed):
    """RingAttention(ulysses_size=2) on 4 ranks: shard -> forward -> gather, gradients through the gather."""
    case = dict(batch=2, seqlen=32, heads=4, heads_k=2, head_dim=8, seed=seed)
    q, k, v, dout = make_inputs(case)
    ref = oracle(q, k, v, dout, causal=True, window=(-1, -1), scale=8 ** -0.5)
    attn = RingAttention(variant="zigzag", causal=True, ulysses_size=2)
    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    out_full = attn.gather(attn(attn.shard(qf), attn.shard(kf), attn.shard(vf)))
    (attn.shard(out_full) * attn.shard(dout)).sum().backward()
    grads = [g.clone() for g in (qf.grad, kf.grad, vf.grad)]
    for g in grads:
        dist.all_reduce(g)
    return {"out": rel_err(out_full, ref[0]), "dq": rel_err(grads[0], ref[2]), "dk": rel_err(grads[1], ref[3]),
            "dv": rel_err(grads[2], ref[4]), "repr": repr(attn)}


def _bad_inputs(pair):
    """(name, callable) pairs that must each raise before any communication, alike on every rank."""
    t = lambda *shape: torch.randn(*shape, dtype=torch.float64)  # noqa: E731
    q, k = t(1, 8, 4, 8), t(1, 8, 2, 8)
    mesh = usp_process_groups(2).attention_groups()
    usp = lambda *a, **kw: usp_attention(*a, **mesh, **kw)  # noqa: E731
    return [
        ("heads not divisible by U", lambda: usp(t(1, 8, 3, 8), t(1, 8, 1, 8), t(1, 8, 1, 8))),
        ("heads not divisible by U=4", lambda: ulysses_attention(t(1, 8, 6, 8), t(1, 8, 2, 8), t(1, 8, 2, 8))),
        ("k shape mismatch", lambda: usp(q, t(1, 6, 2, 8), t(1, 6, 2, 8))),
        ("zigzag odd local length", lambda: usp(t(1, 3, 4, 8), t(1, 3, 2, 8), t(1, 3, 2, 8), variant="zigzag",
                                                causal=True)),
        ("zigzag non-causal", lambda: usp(q, k, k, variant="zigzag")),
        ("softcap on sdpa", lambda: usp(q, k, k, softcap=3.0, backend="sdpa")),
        ("cu_seqlens not integer", lambda: usp(q[0], k[0], k[0], cu_seqlens=torch.tensor([0.0, 8.0]))),
        ("cu_seqlens not splittable", lambda: usp(q[0], k[0], k[0], cu_seqlens=torch.tensor(
            [0, 3, 8], dtype=torch.int32), variant="zigzag", causal=True)),
        ("alibi wrong shape", lambda: usp(q, k, k, alibi_slopes=torch.ones(3))),
        ("ulysses_size does not divide", lambda: usp_process_groups(3)),
        ("ulysses_size not positive", lambda: usp_process_groups(0)),
        ("groups not a mesh", lambda: usp_attention(q, k, k, ulysses_group=dist.group.WORLD,
                                                    ring_group=dist.group.WORLD)),
        ("module ulysses with allgather", lambda: RingAttention(ulysses_size=2, exchange="allgather")),
        ("module ulysses_size does not divide the group", lambda: RingAttention(ulysses_size=4, group=pair)),
        ("head_chunks not dividing", lambda: usp(q, k, k, head_chunks=2)),
    ]


def _head_chunk_difference(rank, seed):
    """The same float64 call on the 2x2 mesh with 1, 2 and 4 head chunks: the largest relative difference of
    out, LSE and gradients between them."""
    q, k, v, dout = make_inputs(dict(batch=1, seqlen=32, heads=8, heads_k=8, head_dim=8, seed=seed))
    local = [get_layout("zigzag").shard(t, rank, 4) for t in (q, k, v, dout)]
    mesh = usp_process_groups(2).attention_groups()
    runs = []
    for chunks in (1, 2, 4):
        ql, kl, vl = (t.clone().requires_grad_() for t in local[:3])
        out, lse = usp_attention(ql, kl, vl, **mesh, variant="zigzag", causal=True, head_chunks=chunks)
        out.backward(local[3])
        runs.append((out, lse, ql.grad, kl.grad, vl.grad))
    return max(rel_err(a, b) for run in runs[1:] for a, b in zip(runs[0], run))


def _error_mid_pipeline(rank, seed):
    """A kernel that fails while the next head chunk's all-to-all is in flight (on every rank): the call
    raises on every rank and the next call on the mesh still works."""
    from ring_flash_attn.kernels import register_backend
    from ring_flash_attn.kernels.reference import ReferenceBackend

    class FailsSecondChunk(ReferenceBackend):
        name = "test_fails_second_chunk"
        calls = 0

        def forward_accumulate(self, *args, **kwargs):
            type(self).calls += 1
            # The second call is chunk 0's last ring step: chunk 1's all-to-all is in flight, the ring's own
            # exchanges are done (the ring engine does not finish an exchange in flight when a kernel raises).
            if type(self).calls == 2:
                raise RuntimeError("kernel failed mid-pipeline")
            return super().forward_accumulate(*args, **kwargs)

    register_backend(FailsSecondChunk())
    q, k, v, _ = make_inputs(dict(batch=1, seqlen=16, heads=4, heads_k=4, head_dim=8, seed=seed))
    local = [get_layout("ring").shard(t, rank, 4) for t in (q, k, v)]
    mesh = usp_process_groups(2).attention_groups()
    try:  # ring layout, non-causal, 2 head chunks: one kernel call per chunk and ring step
        usp_attention(*local, **mesh, head_chunks=2, backend=FailsSecondChunk.name)
    except RuntimeError as exc:
        return str(exc)
    return "no error raised"


def ulysses_checks(rank, world_size, cases, seed):
    """{"errors": {mesh: [per-case errors]}, "module": ..., "bad_inputs": [(name, type, message)], "after": ...}"""
    meshes, pair = _meshes(rank)
    prepared = []
    for case in cases:
        inputs, ref = _oracle_for(case)
        prepared.append((dict(case, inputs=inputs), ref))
    errors = {name: [_case_errors(case, ref, call, cp_rank, cp_size) for case, ref in prepared]
              for name, (call, cp_rank, cp_size) in meshes.items()}
    report = []
    for name, call in _bad_inputs(pair):
        try:
            call()
        except (ValueError, TypeError, NotImplementedError) as exc:
            report.append((name, type(exc).__name__, str(exc)))
        else:
            report.append((name, None, "no error raised"))
    report.append(("error mid-pipeline", "RuntimeError", _error_mid_pipeline(rank, seed)))
    # No rank was left inside a collective: good calls on the 2x2 mesh and on Ulysses over the default group
    # still match the oracle.
    case, ref = prepared[0]
    after = [_case_errors(case, ref, meshes["2x2"][0], rank, 4), _case_errors(case, ref, ulysses_attention, rank, 4)]
    mesh = usp_process_groups(2)
    timeouts = [g._get_backend(torch.device("cpu")).options._timeout.total_seconds()
                for g in (mesh.ulysses_group, mesh.ring_group)]
    return {"errors": errors, "module": _module_round_trip(rank, seed), "bad_inputs": report, "after": after,
            "mesh_timeouts_s": timeouts, "head_chunk_difference": _head_chunk_difference(rank, seed)}


def _ulysses_hostile_meshes(rank):
    """{mesh: attention(q, k, v, **kw)} over all four ranks: Ulysses alone (4x1) and USP (2x2)."""
    mesh = usp_process_groups(2).attention_groups()
    return {"4x1": lambda q, k, v, **kw: ulysses_attention(q, k, v, **kw),
            "2x2": lambda q, k, v, **kw: usp_attention(q, k, v, **mesh, **kw)}


def _clean_error(rank, call, seed):
    """One float64 zigzag call on fresh inputs: the largest relative error of out, LSE and gradients."""
    case = dict(batch=1, seqlen=16, heads=4, heads_k=2, head_dim=8, variant="zigzag", causal=True, dtype="float64",
                backend="reference", seed=seed)
    inputs, ref = _oracle_for(case)
    return max(_case_errors(dict(case, inputs=inputs), ref, call, rank, 4).values())


def ulysses_hostile(rank, world_size, timeout_s):
    """Issue 13's hostile cases on Ulysses and USP, each mesh over all four ranks. Per mesh: a kernel fault at the
    first and the last kernel call of a forward and of a backward, on rank 1 alone and on every rank (what each
    rank raised and how long the call took, then a clean call against the float64 oracle); rank 1 alone passing
    another seqlen, causal or head_chunks (RING_FLASH_ATTN_AGREE=always) or an invalid softcap; double backward;
    a last clean call."""
    import os
    import time

    from ring_flash_attn.kernels import register_backend
    from tests.distributed.hostile_workers import FaultyBackend, _raised

    os.environ.update(RING_FLASH_ATTN_AGREE="always", RING_FLASH_ATTN_WAIT_TIMEOUT_S=str(timeout_s))
    backend = FaultyBackend()
    register_backend(backend)
    faulty = dict(batch=1, seqlen=16, heads=8, heads_k=8, head_dim=8, variant="zigzag", causal=True,
                  dtype="float64", backend=backend.name, seed=11)
    inputs, ref = _oracle_for(faulty)
    faulty["inputs"] = inputs
    t = lambda *shape: torch.randn(*shape, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)  # noqa: E731
    report = {}
    for name, call in _ulysses_hostile_meshes(rank).items():
        backend.arm(None, -1, ())
        _case_errors(faulty, ref, call, rank, 4)  # unarmed: counts the kernel calls
        counts = dict(backend.calls)
        faults = []
        for phase, index, ranks in [(phase, index, ranks) for phase in ("forward", "backward")
                                    for index in sorted({0, counts[phase] - 1}) for ranks in ((1,), (0, 1, 2, 3))]:
            backend.arm(phase, index, ranks)
            started = time.perf_counter()
            raised = _raised(lambda: _case_errors(faulty, ref, call, rank, 4))
            elapsed = time.perf_counter() - started
            backend.arm(None, -1, ())
            faults.append(dict(case=(phase, index, ranks), raised=raised, elapsed=elapsed,
                               clean=_clean_error(rank, call, seed=200 + len(faults))))
        base = dict(variant="ring", causal=True, backend="reference", head_chunks=1)
        q = lambda seqlen=8: t(1, seqlen, 8, 8).requires_grad_()  # noqa: E731
        kv = lambda seqlen=8: t(1, seqlen, 8, 8)  # noqa: E731
        changed = {"seqlen": (lambda: call(q(16), kv(16), kv(16), **base)),
                   "causal": (lambda: call(q(), kv(), kv(), **dict(base, causal=False))),
                   "head_chunks": (lambda: call(q(), kv(), kv(), **dict(base, head_chunks=2))),
                   "invalid softcap": (lambda: call(q(), kv(), kv(), **dict(base, softcap=-1.0)))}
        disagreements = {what: _raised(changed[what] if rank == 1 else lambda: call(q(), kv(), kv(), **base))
                         for what in changed}
        q_double = q()
        out, _ = call(q_double, kv(), kv(), **base)
        double = _raised(lambda: torch.autograd.grad(out.sum(), q_double, create_graph=True))
        report[name] = dict(counts=counts, faults=faults, disagreements=disagreements, double=double,
                            clean=_clean_error(rank, call, seed=300))
    return report


def ulysses_once_lone_rejection(rank, world_size, timeout_s):
    """RING_FLASH_ATTN_AGREE=once on Ulysses over two ranks: after an agreed call and a repeated one (no check),
    rank 1 alone rejects its arguments and checks while rank 0 makes the agreed call and waits in its first
    all-to-all. Both raise within the bound (the check is a tagged send and receive, never met by the all-to-all:
    nothing aborts). The group is unusable afterwards, so this runs in a world of its own."""
    import os
    import time

    from ring_flash_attn import agreement
    from tests.distributed.hostile_workers import _raised

    os.environ.update(RING_FLASH_ATTN_AGREE="once", RING_FLASH_ATTN_WAIT_TIMEOUT_S=str(timeout_s))
    agreement._last_agreed.clear()
    call = lambda q, k, v, **kw: ulysses_attention(q, k, v, **kw)  # noqa: E731
    local = dict(batch=1, seqlen=8, heads=4, heads_k=2, head_dim=8, variant="zigzag", causal=True, dtype="float64",
                 backend="reference")
    clean, rounds = [], []
    original = agreement._gather_ints
    agreement._gather_ints = lambda *args, **kwargs: rounds.append(args[-1]) or original(*args, **kwargs)
    for seed in (1, 2):
        inputs, ref = _oracle_for(dict(local, seed=seed))
        rounds.clear()
        clean.append(max(_case_errors(dict(local, seed=seed, inputs=inputs), ref, call, rank, 2).values()))
    repeated_rounds = list(rounds)  # the check rounds of the repeated call
    inputs, ref = _oracle_for(dict(local, seed=2))
    started = time.perf_counter()  # the same moment on both ranks (after the last call they both made)
    if rank == 1:  # rank 0 waits first, so its bound ends first: a rank whose wait times out may close its
        time.sleep(1.0)  # connections, and the other would then see that instead of its own timeout
    if rank == 0:
        raised = _raised(lambda: _case_errors(dict(local, seed=2, inputs=inputs), ref, call, rank, 2))
    else:
        raised = _raised(lambda: _case_errors(dict(local, seed=2, inputs=inputs, softcap=-1.0), ref, call, rank, 2))
    elapsed = time.perf_counter() - started
    if rank == 1:  # stay until rank 0's wait has run out: an exiting process closes its connections, which
        time.sleep(timeout_s + 2)  # rank 0 would see first
    return dict(clean=clean, raised=raised, elapsed=elapsed, repeated_rounds=repeated_rounds)
