"""Functions that run on every rank of a test world (module level, so spawn can pickle them)."""

from __future__ import annotations

import torch

from ring_flash_attn import ring_attention
from ring_flash_attn.kernels import get_backend
from ring_flash_attn.ring.layouts import get_layout
from tests.tolerances import rel_err

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# cu_seqlens may be int32 or int64 (flash-attn's convention)
CU_DTYPES = {"int32": torch.int32, "int64": torch.int64}


def oracle(q, k, v, dout, *, causal, window, scale, softcap=0.0, alibi_slopes=None):
    """Full attention in float64 on one process: out, lse, dq, dk, dv."""
    ref = get_backend("reference")
    kw = dict(scale=scale, causal=causal, window=window, softcap=softcap)
    if alibi_slopes is not None:
        kw.update(alibi_slopes=alibi_slopes.double(), alibi_delta=0, alibi_stride=1)
    out, lse = ref.forward(q, k, v, **kw)
    dq, dk, dv = ref.backward(dout, q, k, v, out, lse, **kw)
    return out, lse, dq, dk, dv


def alibi_slopes_for(case):
    """Fresh ALiBi slopes for a case that asks for them (None otherwise)."""
    if not case.get("alibi"):
        return None
    return torch.rand(case["heads"], generator=torch.Generator().manual_seed(case["seed"] + 7)) * 0.5 + 0.05


def make_inputs(case):
    g = torch.Generator().manual_seed(case["seed"])
    b, s, h, hk, d = case["batch"], case["seqlen"], case["heads"], case["heads_k"], case["head_dim"]
    q = torch.randn(b, s, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, s, hk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, s, hk, d, generator=g, dtype=torch.float64)
    dout = torch.randn(b, s, h, d, generator=g, dtype=torch.float64)
    return q, k, v, dout


def packed_oracle(q, k, v, dout, seqlens, **kw):
    """The oracle for packed sequences [1, total, H, D]: each sequence attends only to itself."""
    bounds = _cumsum(seqlens)
    parts = [oracle(*(t[:, a:b] for t in (q, k, v, dout)), **kw) for a, b in zip(bounds, bounds[1:]) if b > a]
    return tuple(torch.cat([p[i] for p in parts], dim=2 if i == 1 else 1) for i in range(5))


def _cumsum(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def ring_errors(rank, world_size, cases):
    """For each case: this rank's relative errors of out, lse, dq, dk, dv against the float64 oracle.

    A case with ``seqlens`` (global lengths of packed sequences) runs the varlen path with this rank's
    ``cu_seqlens`` (each sequence split over the ranks by the variant's layout)."""
    from ring_flash_attn.ring.layouts import PackedLayout

    results = []
    for case in cases:
        window = tuple(case.get("window", (-1, -1)))
        slopes = alibi_slopes_for(case)
        kw = dict(causal=case["causal"], window=window, scale=case["head_dim"] ** -0.5, softcap=case.get("softcap", 0.0),
                  alibi_slopes=slopes)
        seqlens = case.get("seqlens")
        if seqlens:
            case = dict(case, seqlen=sum(seqlens))
        q, k, v, dout = make_inputs(case)
        if seqlens:
            ref = packed_oracle(q, k, v, dout, seqlens, **kw)
            local_lengths = tuple(n // world_size for n in seqlens)
            layout = PackedLayout(get_layout(case["variant"]), local_lengths)
        else:
            ref = oracle(q, k, v, dout, **kw)
            layout = get_layout(case["variant"])
        dtype = DTYPES[case["dtype"]]

        def local(x, dim=1):
            return layout.shard(x, rank, world_size, dim)

        ql, kl, vl = (local(t).to(dtype).requires_grad_() for t in (q, k, v))
        if seqlens:
            cu = torch.tensor(_cumsum(local_lengths), dtype=CU_DTYPES[case.get("cu_dtype", "int32")])
            out, lse = ring_attention(ql[0], kl[0], vl[0], variant=case["variant"], causal=case["causal"],
                                      window_size=window, softcap=case.get("softcap", 0.0), backend=case["backend"],
                                      cu_seqlens=cu, alibi_slopes=slopes)
            out, lse = out.unsqueeze(0), lse.unsqueeze(0)
        else:
            out, lse = ring_attention(ql, kl, vl, variant=case["variant"], causal=case["causal"], window_size=window,
                                      softcap=case.get("softcap", 0.0), backend=case["backend"], alibi_slopes=slopes)
        out.backward(local(dout).to(dtype))
        got = (out, lse, ql.grad, kl.grad, vl.grad)
        want = (local(ref[0]), local(ref[1], dim=2), local(ref[2]), local(ref[3]), local(ref[4]))
        results.append({name: rel_err(g_, w_) for name, g_, w_ in zip(("out", "lse", "dq", "dk", "dv"), got, want)})
    return results


def _bad_inputs(rank, world_size):
    """(name, callable) pairs that must each raise before any communication."""
    import ring_flash_attn as rfa
    from ring_flash_attn.kernels import register_backend
    from ring_flash_attn.kernels.base import KernelBackend

    class HeadDim64Only(KernelBackend):
        name = "test_head_dim_64_only"

        def unsupported_reason(self, f):
            return None if f.head_dim == 64 else f"head_dim must be 64, got {f.head_dim}"

    register_backend(HeadDim64Only())

    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype)

    q, k = t(1, 8, 4, 16), t(1, 8, 2, 16)
    outsider = torch.distributed.new_group([0, 1])  # every rank must take part in creating it
    cases = [
        ("k seqlen mismatch", lambda: rfa.ring_flash_attn_func(q, t(1, 6, 2, 16), t(1, 6, 2, 16))),
        ("v shape mismatch", lambda: rfa.ring_flash_attn_func(q, k, t(1, 8, 1, 16))),
        ("head_dim mismatch", lambda: rfa.ring_flash_attn_func(q, t(1, 8, 2, 8), t(1, 8, 2, 8))),
        ("heads_k does not divide", lambda: rfa.ring_flash_attn_func(t(1, 8, 4, 16), t(1, 8, 3, 16), t(1, 8, 3, 16))),
        ("dtype mismatch", lambda: rfa.ring_flash_attn_func(q, k.double(), k.double())),
        ("integer dtype", lambda: rfa.ring_flash_attn_func(q.int(), k.int(), k.int())),
        ("3-d input", lambda: rfa.ring_flash_attn_func(q[0], k[0], k[0])),
        ("zigzag odd local length", lambda: rfa.zigzag_ring_flash_attn_func(t(1, 7, 4, 16), t(1, 7, 2, 16),
                                                                          t(1, 7, 2, 16), causal=True)),
        ("zigzag non-causal", lambda: rfa.zigzag_ring_flash_attn_func(q, k, k, causal=False)),
        ("head dim the backend cannot take", lambda: rfa.ring_flash_attn_func(q, k, k, backend=HeadDim64Only.name)),
        ("softcap on a backend without it", lambda: rfa.ring_flash_attn_func(q, k, k, softcap=5.0, backend="sdpa")),
        ("unknown backend", lambda: rfa.ring_flash_attn_func(q, k, k, backend="nope")),
        ("bad window", lambda: rfa.ring_flash_attn_func(q, k, k, window_size=(-2, 0))),
        ("dropout", lambda: rfa.ring_flash_attn_func(q, k, k, dropout_p=0.1)),
        ("alibi on a backend without it", lambda: rfa.ring_flash_attn_func(q, k, k, alibi_slopes=torch.ones(4),
                                                                           backend="sdpa")),
        ("alibi wrong shape", lambda: rfa.ring_flash_attn_func(q, k, k, alibi_slopes=torch.ones(3))),
        ("bad kv packing", lambda: rfa.ring_flash_attn_kvpacked_func(q, t(1, 8, 3, 2, 16))),
    ]
    tokens = lambda n: (t(n, 4, 16), t(n, 2, 16), t(n, 2, 16))  # noqa: E731
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    cases += [
        ("cu_seqlens not integer", lambda: rfa.ring_flash_attn_varlen_func(*tokens(8), torch.tensor([0.0, 8.0]), 8)),
        ("cu_seqlens not from 0", lambda: rfa.ring_flash_attn_varlen_func(*tokens(8), i32([1, 8]), 8)),
        ("cu_seqlens not increasing", lambda: rfa.ring_flash_attn_varlen_func(*tokens(8), i32([0, 5, 3, 8]), 8)),
        ("cu_seqlens not ending at total", lambda: rfa.ring_flash_attn_varlen_func(*tokens(8), i32([0, 6]), 8)),
        ("cu_seqlens not splittable", lambda: rfa.zigzag_ring_flash_attn_varlen_func(*tokens(8), i32([0, 3, 8]), 5,
                                                                                    causal=True)),
        ("max_seqlen too small", lambda: rfa.ring_flash_attn_varlen_func(*tokens(8), i32([0, 8]), 4)),
        ("max_seqlen not an int", lambda: rfa.ring_flash_attn_varlen_func(*tokens(8), i32([0, 8]), None)),
        ("llama3 empty batch", lambda: rfa.llama3_flash_attn_prepare_cu_seqlens(i32([0, 0, 0]), True, rank,
                                                                               world_size)),
        ("varlen 4-d input", lambda: rfa.ring_flash_attn_varlen_func(q, k, k, i32([0, 8]), 8)),
        ("heads_k_stride does not divide", lambda: rfa.zigzag_llama3_flash_attn_varlen_func(
            *tokens(8), i32([0, 8]), 8, 3)),
        ("llama3 cu_seqlens not splittable", lambda: rfa.llama3_flash_attn_prepare_cu_seqlens(
            i32([0, 3, 7 * world_size + 1]), True, rank, world_size)),
        ("llama3 bad local_k_slice", lambda: rfa.llama3_flash_attn_varlen_func(
            *tokens(8), i32([0, 8]), i32([0, 8]), 8, 8, 1, slice(0, 100 * world_size))),
    ]
    if rank == 2:
        cases.append(("group without this rank", lambda: rfa.ring_flash_attn_func(q, k, k, group=outsider)))
    return cases, outsider


def bad_input_errors(rank, world_size):
    """Run every bad input; report (name, exception type, message). Then prove the ring still works (no rank is
    stuck in a collective) with one good call whose result is checked against the oracle."""
    cases, _ = _bad_inputs(rank, world_size)
    report = []
    for name, call in cases:
        try:
            call()
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as exc:
            report.append((name, type(exc).__name__, str(exc)))
        else:
            report.append((name, None, "no error raised"))
    errs = ring_errors(rank, world_size, [dict(variant="zigzag", causal=True, backend="sdpa", dtype="float64",
                                               heads_k=2, batch=1, seqlen=24, heads=4, head_dim=8, seed=1234)])
    return report, errs[0]


def module_round_trip(rank, world_size, variant, seed, exchange="ring"):
    """Full batch -> RingAttention.shard -> module -> RingAttention.gather; errors of the gathered output and of
    the full-sequence input gradients (through the differentiable gather) against the oracle."""
    from ring_flash_attn import RingAttention

    case = dict(batch=2, seqlen=8 * world_size, heads=4, heads_k=2, head_dim=8, seed=seed)
    q, k, v, dout = make_inputs(case)
    ref = oracle(q, k, v, dout, causal=True, window=(-1, -1), scale=8 ** -0.5)
    attn = RingAttention(variant=variant, causal=True, exchange=exchange, heads_k_stride=1)
    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    out_full = attn.gather(attn(attn.shard(qf), attn.shard(kf), attn.shard(vf)))
    # Every rank holds the full output; each rank's loss covers its own slice so the sum over ranks is the total.
    (attn.shard(out_full) * attn.shard(dout)).sum().backward()
    grads = [g.clone() for g in (qf.grad, kf.grad, vf.grad)]
    for g in grads:
        torch.distributed.all_reduce(g)
    return {"out": rel_err(out_full, ref[0]), "dq": rel_err(grads[0], ref[2]), "dk": rel_err(grads[1], ref[3]),
            "dv": rel_err(grads[2], ref[4])}


def module_checks(rank, world_size, round_trips, seed, with_repeatability):
    """Several :func:`module_round_trip` cases (``(variant, exchange)``) and optionally :func:`repeatability`
    in one world: a world start costs more than the checks."""
    results = {"round_trips": [module_round_trip(rank, world_size, variant, seed + n, exchange)
                               for n, (variant, exchange) in enumerate(round_trips)]}
    if with_repeatability:
        results["repeatability"] = repeatability(rank, world_size, seed + 100)
    return results


def llama3_errors(rank, world_size, cases):
    """All-gather attention: the replaced project's contiguous llama3 layout (``layout="llama3"``) or our
    load-balanced zigzag one (``layout="zigzag"``), against the packed float64 oracle."""
    import ring_flash_attn as rfa
    from ring_flash_attn.ring.layouts import PackedLayout

    results = []
    for case in cases:
        seqlens, window = case["seqlens"], tuple(case.get("window", (-1, -1)))
        slopes = alibi_slopes_for(case)
        kw = dict(causal=case["causal"], window=window, scale=case["head_dim"] ** -0.5, alibi_slopes=slopes)
        q, k, v, dout = make_inputs(dict(case, seqlen=sum(seqlens)))
        ref = packed_oracle(q, k, v, dout, seqlens, **kw)
        dtype = DTYPES[case["dtype"]]
        total = sum(seqlens)
        if case["layout"] == "llama3":
            piece = total // world_size
            local = lambda x, dim=1: x.narrow(dim, rank * piece, piece)  # noqa: E731
            cu = torch.tensor(_cumsum(seqlens), dtype=CU_DTYPES[case.get("cu_dtype", "int32")])
            args = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, case["causal"], rank, world_size)
            call = lambda ql, kl, vl: rfa.llama3_flash_attn_varlen_func(  # noqa: E731
                ql, kl, vl, *args[:4], case["heads_k_stride"], args[4], causal=case["causal"], window_size=window,
                alibi_slopes=slopes, return_attn_probs=True, backend=case["backend"])
        else:
            layout = PackedLayout(get_layout("zigzag"), tuple(n // world_size for n in seqlens))
            local = lambda x, dim=1: layout.shard(x, rank, world_size, dim)  # noqa: E731
            cu = torch.tensor(_cumsum([n // world_size for n in seqlens]),
                              dtype=CU_DTYPES[case.get("cu_dtype", "int32")])
            call = lambda ql, kl, vl: rfa.zigzag_llama3_flash_attn_varlen_func(  # noqa: E731
                ql, kl, vl, cu, max(seqlens), case["heads_k_stride"], causal=True, window_size=window,
                alibi_slopes=slopes, return_attn_probs=True, backend=case["backend"])
        ql, kl, vl = (local(t)[0].to(dtype).requires_grad_() for t in (q, k, v))
        out, lse, _ = call(ql, kl, vl)
        out.backward(local(dout)[0].to(dtype))
        got = (out, lse, ql.grad, kl.grad, vl.grad)
        want = (local(ref[0])[0], local(ref[1], dim=2)[0], local(ref[2])[0], local(ref[3])[0], local(ref[4])[0])
        results.append({name: rel_err(g_, w_) for name, g_, w_ in zip(("out", "lse", "dq", "dk", "dv"), got, want)})
    return results


def repeatability(rank, world_size, seed):
    """deterministic=True: two identical calls give bitwise-identical outputs and gradients; and
    return_attn_probs=True returns (out, lse, None) with the same out."""
    import ring_flash_attn as rfa

    q, k, v, dout = make_inputs(dict(batch=1, seqlen=16 * world_size, heads=4, heads_k=2, head_dim=16, seed=seed))
    local = [rfa.shard_sequence(t, "zigzag", rank, world_size).float() for t in (q, k, v, dout)]
    runs = []
    for _ in range(2):
        ql, kl, vl = (t.clone().requires_grad_() for t in local[:3])
        out, lse, probs = rfa.zigzag_ring_flash_attn_func(ql, kl, vl, causal=True, deterministic=True,
                                                          return_attn_probs=True)
        out.backward(local[3])
        runs.append((out, lse, ql.grad, kl.grad, vl.grad, probs))
    plain = rfa.zigzag_ring_flash_attn_func(*local[:3], causal=True)
    return {"bitwise_equal": all(torch.equal(a, b) for a, b in zip(runs[0][:5], runs[1][:5])),
            "probs_is_none": runs[0][5] is None, "lse_shape": tuple(runs[0][1].shape),
            "plain_equals": torch.equal(plain, runs[0][0])}


def llama3_varlen_errors(rank, world_size, cases):
    """:func:`llama3_errors` with the reference backend standing in for a variable-length kernel where sdpa's
    FlashAttention-2 would serve one (no band, softcap or ALiBi; its per-block default computes), and how many
    variable-length calls the all-gather engine made (forward and backward)."""
    from unittest import mock

    from ring_flash_attn.kernels.reference import ReferenceBackend

    made = []
    calls = {name: getattr(ReferenceBackend, name) for name in ("forward_varlen", "backward_varlen")}
    with mock.patch.object(ReferenceBackend, "serves_varlen", lambda self, f: not (f.band or f.softcap or f.alibi)), \
            mock.patch.object(ReferenceBackend, "forward_varlen", lambda self, *a, **kw: made.append("forward")
                              or calls["forward_varlen"](self, *a, **kw)), \
            mock.patch.object(ReferenceBackend, "backward_varlen", lambda self, *a, **kw: made.append("backward")
                              or calls["backward_varlen"](self, *a, **kw)):
        errors = llama3_errors(rank, world_size, cases)
    return errors, made
