"""Functions that run on every rank of a test world (module level, so spawn can pickle them)."""

from __future__ import annotations

import torch

from ring_flash_attn import ring_attention
from ring_flash_attn.kernels import get_backend
from ring_flash_attn.ring.layouts import get_layout
from tests.tolerances import rel_err

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def oracle(q, k, v, dout, *, causal, window, scale, softcap=0.0):
    """Full attention in float64 on one process: out, lse, dq, dk, dv."""
    ref = get_backend("reference")
    kw = dict(scale=scale, causal=causal, window=window, softcap=softcap)
    out, lse = ref.forward(q, k, v, **kw)
    dq, dk, dv = ref.backward(dout, q, k, v, out, lse, **kw)
    return out, lse, dq, dk, dv


def make_inputs(case):
    g = torch.Generator().manual_seed(case["seed"])
    b, s, h, hk, d = case["batch"], case["seqlen"], case["heads"], case["heads_k"], case["head_dim"]
    q = torch.randn(b, s, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, s, hk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, s, hk, d, generator=g, dtype=torch.float64)
    dout = torch.randn(b, s, h, d, generator=g, dtype=torch.float64)
    return q, k, v, dout


def ring_errors(rank, world_size, cases):
    """For each case: this rank's relative errors of out, lse, dq, dk, dv against the float64 oracle."""
    results = []
    for case in cases:
        q, k, v, dout = make_inputs(case)
        window = tuple(case.get("window", (-1, -1)))
        scale = case["head_dim"] ** -0.5
        ref = oracle(q, k, v, dout, causal=case["causal"], window=window, scale=scale, softcap=case.get("softcap", 0.0))
        layout = get_layout(case["variant"])
        dtype = DTYPES[case["dtype"]]

        def local(x, dim=1):
            return layout.shard(x, rank, world_size, dim)

        ql, kl, vl = (local(t).to(dtype).requires_grad_() for t in (q, k, v))
        out, lse = ring_attention(ql, kl, vl, variant=case["variant"], causal=case["causal"], window_size=window,
                                  softcap=case.get("softcap", 0.0), backend=case["backend"])
        out.backward(local(dout).to(dtype))
        got = (out, lse, ql.grad, kl.grad, vl.grad)
        want = (local(ref[0]), local(ref[1], dim=2), local(ref[2]), local(ref[3]), local(ref[4]))
        results.append({name: rel_err(g_, w_) for name, g_, w_ in zip(("out", "lse", "dq", "dk", "dv"), got, want)})
    return results
