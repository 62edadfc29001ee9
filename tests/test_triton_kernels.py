"""The Triton kernels against the float64 oracle, on the CPU under TRITON_INTERPRET=1.

Tiny shapes with odd lengths, so partial tiles, band edges, empty rows and GQA
are all exercised with 16x16 tiles. Tolerances: tests/tolerances.py.
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton; CI installs it)")

from ring_flash_attn.kernels import get_backend  # noqa: E402
from ring_flash_attn.merge import merge_into_eager  # noqa: E402
from tests.tolerances import FORWARD, GRADIENT, rel_err  # noqa: E402

# tests/conftest.py sets TRITON_INTERPRET=1 on machines without a GPU; with a GPU these run compiled there.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

# (dtype, head_dim, heads, heads_k, seqlen_q, seqlen_k, causal, window, q_offset, k_offset)
CASES = [
    (torch.float32, 64, 4, 2, 37, 45, False, (-1, -1), 0, 0),      # plain, GQA, partial tiles
    (torch.float32, 64, 2, 2, 40, 40, True, (-1, -1), 0, 0),       # top-left causal
    (torch.bfloat16, 128, 4, 1, 33, 48, True, (-1, -1), 20, 0),    # causal, query block later (MQA)
    (torch.float16, 64, 4, 2, 35, 29, False, (7, 3), 10, 0),       # sliding window with offsets
    (torch.bfloat16, 64, 4, 2, 30, 30, True, (5, -1), 0, 12),      # causal window, key block later: empty rows
    (torch.float16, 128, 2, 1, 24, 24, True, (-1, -1), 0, 40),     # block entirely masked
]


def _case_id(case):
    dtype, d, h, hk, sq, sk, causal, window, qo, ko = case
    return f"{str(dtype)[6:]}-d{d}-h{h}/{hk}-{sq}x{sk}-{'causal' if causal else 'full'}-w{window}-off{qo},{ko}"


def _inputs(case, generator):
    dtype, d, h, hk, sq, sk, causal, window, qo, ko = case

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE, dtype)

    q, k, v = randn(1, sq, h, d), randn(1, sk, hk, d), randn(1, sk, hk, d)
    dout = randn(1, sq, h, d)
    kwargs = dict(scale=d ** -0.5, causal=causal, window=window, q_offset=qo, k_offset=ko)
    return q, k, v, dout, kwargs


@pytest.fixture
def generator(request):
    # Fresh inputs per run, reproducible from the printed seed on failure.
    seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_backward_match_oracle(case, generator):
    triton_backend, oracle = get_backend("triton"), get_backend("reference")
    q, k, v, dout, kw = _inputs(case, generator)
    dtype = q.dtype
    out, lse = triton_backend.forward(q, k, v, **kw)
    ref_out, ref_lse = oracle.forward(q.double(), k.double(), v.double(), **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert rel_err(out, ref_out) <= FORWARD[dtype]
    assert rel_err(lse, ref_lse) <= FORWARD[torch.float32]  # the LSE is float32 whatever the inputs
    unseen = torch.isinf(ref_lse)
    assert bool((out.transpose(1, 2)[unseen] == 0).all()), "rows that see no key must give out = 0"

    # The backward gets the GLOBAL out/lse; here the block is the whole sequence, so the oracle's.
    grads = triton_backend.backward(dout, q, k, v, ref_out.to(dtype), ref_lse.float(), **kw)
    ref_grads = oracle.backward(dout.double(), q.double(), k.double(), v.double(), ref_out, ref_lse, **kw)
    for name, got, want, like in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert got.dtype == like.dtype and got.shape == like.shape, name
        assert rel_err(got, want) <= GRADIENT[dtype], name


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4]], ids=_case_id)
def test_forward_accumulate_equals_forward_then_merge(case, generator):
    """Folding a block in (kernel epilogue) == forward then merge, from a running state with unseen rows."""
    backend = get_backend("triton")
    q, k, v, _, kw = _inputs(case, generator)
    b, sq, h, d = q.shape
    out_acc = torch.randn(b, sq, h, d, generator=generator).to(DEVICE)
    lse_acc = torch.randn(b, h, sq, generator=generator).to(DEVICE)
    lse_acc[:, :, : sq // 3] = float("-inf")  # rows no earlier block reached
    out_acc[:, : sq // 3] = 0.0
    want_out, want_lse = out_acc.double(), lse_acc.double()
    ref_out, ref_lse = get_backend("reference").forward(q.double(), k.double(), v.double(), **kw)
    merge_into_eager(want_out, want_lse, ref_out, ref_lse)

    backend.forward_accumulate(q, k, v, out_acc, lse_acc, **kw)
    assert rel_err(out_acc, want_out) <= FORWARD[q.dtype]
    assert rel_err(lse_acc, want_lse) <= FORWARD[torch.float32]


def test_fused_merge_equals_eager_merge(generator):
    from ring_flash_attn.kernels.triton_merge import triton_merge_into

    b, s, h, d = 2, 37, 3, 80  # head_dim not a power of two: masked columns
    out_acc = torch.randn(b, s, h, d, generator=generator).to(DEVICE)
    lse_acc = torch.randn(b, h, s, generator=generator).to(DEVICE)
    out_blk = torch.randn(b, h, s, d, generator=generator).to(DEVICE, torch.bfloat16).transpose(1, 2)  # as [B,H,S,D] ops give
    lse_blk = torch.randn(b, h, s, generator=generator).to(DEVICE)
    lse_acc[0, 1, :5] = float("-inf")
    out_acc[0, :5, 1] = 0.0
    lse_blk[0, 1, 2:9] = float("-inf")  # rows 2-4 unseen by both, rows 5-8 only by the accumulator
    want_out, want_lse = out_acc.double(), lse_acc.double()
    merge_into_eager(want_out, want_lse, out_blk, lse_blk)

    triton_merge_into(out_acc, lse_acc, out_blk, lse_blk)
    assert rel_err(out_acc, want_out) <= FORWARD[torch.float32]
    assert rel_err(lse_acc, want_lse) <= FORWARD[torch.float32]
    assert bool((out_acc[0, 2:5, 1] == 0).all()) and not bool(torch.isnan(out_acc).any())


def test_calls_past_the_grid_limit_run_in_parts_of_the_batch(generator, monkeypatch):
    """A batched call whose (batch x heads) programs pass a grid's y size (65535 on CUDA) is launched in parts
    of the batch: the limit is lowered here so that a tiny call takes that path; its results must be exactly
    those of the call in one launch (the same programs, launched in groups)."""
    from ring_flash_attn.kernels import triton_merge

    dtype, d, h, hk, sq, sk = torch.float16, 64, 4, 2, 21, 19
    b = 5

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE, dtype)

    q, k, v, dout = randn(b, sq, h, d), randn(b, sk, hk, d), randn(b, sk, hk, d), randn(b, sq, h, d)
    kwargs = dict(scale=d ** -0.5, causal=True, window=(6, -1), q_offset=3, k_offset=0)
    acc = (torch.randn(b, sq, h, d, generator=generator).to(DEVICE), torch.randn(b, h, sq, generator=generator).to(DEVICE))
    backend = get_backend("triton")

    def run():
        out, lse = backend.forward(q, k, v, **kwargs)
        out_acc, lse_acc = acc[0].clone(), acc[1].clone()
        backend.forward_accumulate(q, k, v, out_acc, lse_acc, **kwargs)
        merged = acc[0].clone(), acc[1].clone()
        triton_merge.triton_merge_into(*merged, out, lse)
        return (out, lse, out_acc, lse_acc, *merged, *backend.backward(dout, q, k, v, out, lse, **kwargs))

    whole = run()
    monkeypatch.setattr(triton_merge, "MAX_GRID_Y", 2 * h)  # two batch entries per launch: parts 2, 2, 1
    assert [p.indices(b) for p in triton_merge.batch_parts(b, h)] == [(0, 2, 1), (2, 4, 1), (4, 5, 1)]
    in_parts = run()
    for name, a, c in zip(("out", "lse", "out_acc", "lse_acc", "merged out", "merged lse", "dq", "dk", "dv"),
                          whole, in_parts):
        assert torch.equal(a, c), name
