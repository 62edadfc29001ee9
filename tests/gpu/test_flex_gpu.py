"""The flex backend's compiled FlexAttention kernels on a CUDA device against the float64 oracle.

The backward is checked with GLOBAL statistics that differ from the block's own
(the block merged with another one), so the gradient FlexAttention takes
through its LSE is exercised, as in a ring. Tolerances: tests/tolerances.py.
"""

import pytest
import torch

from ring_flash_attn import ring_attention
from ring_flash_attn.comm.loopback import LoopbackComm
from ring_flash_attn.kernels import Features, get_backend, select_backend
from ring_flash_attn.merge import merge_into_eager, new_accumulators
from ring_flash_attn.ring.layouts import get_layout
from tests.tolerances import FORWARD, GRADIENT, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
CAUSAL_OFFSET = dict(causal=True, window=(-1, -1), q_offset=384, k_offset=0)
WINDOW = dict(causal=False, window=(100, 37), q_offset=64, k_offset=0)
SLIDING = dict(causal=True, window=(256, -1), q_offset=512, k_offset=0)     # Mistral-style, across blocks
EMPTY_ROWS = dict(causal=True, window=(-1, -1), q_offset=0, k_offset=200)  # first rows see nothing
PLAIN = dict(causal=False, window=(-1, -1), q_offset=0, k_offset=0)          # no block mask

# (dtype, head_dim, heads, heads_k, seqlen_q, seqlen_k, mask, softcap)
# Few shapes and dtypes: each (shape, dtype, mask kind, grad mode) is a compilation of its own.
CASES = [(dt, d, 8, 2, 500, 700, m, 0.0) for dt, d in ((BF16, 64), (BF16, 128), (FP16, 128), (FP32, 128))
         for m in (CAUSAL_OFFSET, WINDOW, EMPTY_ROWS)]
CASES += [(BF16, 128, 8, 2, 500, 700, m, 50.0) for m in (SLIDING, EMPTY_ROWS, PLAIN)]
CASES += [(BF16, 128, 8, 1, 640, 640, SLIDING, 0.0), (FP32, 96, 4, 4, 300, 300, WINDOW, 30.0)]


def _id(case):
    dtype, d, h, hk, sq, sk, mask, softcap = case
    return (f"{str(dtype)[6:]}-d{d}-h{h}/{hk}-{sq}x{sk}-c{int(mask['causal'])}-w{mask['window']}"
            f"-o{mask['q_offset']},{mask['k_offset']}-cap{softcap:g}")


def _randn(g, *shape, dtype):
    """Drawn in ``dtype``, returned in float64: the oracle sees exactly the inputs the backend sees."""
    return torch.randn(*shape, device="cuda", generator=g, dtype=torch.float64).to(dtype).double()


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_flex_matches_oracle_with_global_statistics(case):
    dtype, d, h, hk, sq, sk, mask, softcap = case
    flex, oracle = get_backend("flex"), get_backend("reference")
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2 ** 31 - 1, ()).item()))
    q, dout = _randn(g, 1, sq, h, d, dtype=dtype), _randn(g, 1, sq, h, d, dtype=dtype)
    k, v = _randn(g, 1, sk, hk, d, dtype=dtype), _randn(g, 1, sk, hk, d, dtype=dtype)
    kw = dict(scale=d ** -0.5, softcap=softcap, **mask)
    out, lse = flex.forward(q.to(dtype), k.to(dtype), v.to(dtype), **kw)
    ref_out, ref_lse = oracle.forward(q, k, v, **kw)
    errors = {"out": rel_err(out, ref_out), "lse": rel_err(lse, ref_lse)}

    # The ring's global result: this block merged with another block the same rows saw.
    glob_out, glob_lse = new_accumulators(q)
    merge_into_eager(glob_out, glob_lse, ref_out, ref_lse)
    merge_into_eager(glob_out, glob_lse, torch.randn_like(ref_out), torch.randn_like(ref_lse))
    acc_out, acc_lse = glob_out.float(), glob_lse.float()
    flex.forward_accumulate(q.to(dtype), k.to(dtype), v.to(dtype), acc_out, acc_lse, **kw)
    want_out, want_lse = glob_out.clone(), glob_lse.clone()
    merge_into_eager(want_out, want_lse, ref_out, ref_lse)
    errors.update(acc_out=rel_err(acc_out, want_out), acc_lse=rel_err(acc_lse, want_lse))

    grads = flex.backward(dout.to(dtype), q.to(dtype), k.to(dtype), v.to(dtype), glob_out.to(dtype), glob_lse.float(),
                          **kw)
    ref_grads = oracle.backward(dout, q, k, v, glob_out, glob_lse, **kw)
    errors.update({n: rel_err(x, r) for n, x, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    print(_id(case), {n: f"{e:.2e}" for n, e in errors.items()})
    assert out.dtype == dtype and lse.dtype == torch.float32
    for n in ("out", "acc_out"):
        assert errors[n] <= FORWARD[dtype], n
    for n in ("lse", "acc_lse"):
        assert errors[n] <= FORWARD[FP32], n
    for n in ("dq", "dk", "dv"):
        assert errors[n] <= GRADIENT[dtype], n
    if mask is EMPTY_ROWS:
        assert bool((lse[:, :, :200] == float("-inf")).all()) and bool((out[:, :200] == 0).all())


def test_one_compiled_kernel_serves_every_band_of_a_block_shape():
    """The band's bounds are tensors: a new band of a known shape must not compile again."""
    from torch._dynamo.utils import counters

    flex = get_backend("flex")
    q = torch.randn(1, 512, 8, 128, device="cuda", dtype=BF16)
    k = torch.randn(1, 512, 2, 128, device="cuda", dtype=BF16)
    flex.forward(q, k, k, scale=0.1, causal=True, window=(100, -1), q_offset=0, k_offset=0)
    graphs = counters["stats"]["unique_graphs"]
    for q_offset, window in ((512, (300, -1)), (1024, (700, -1)), (256, (64, 0))):
        flex.forward(q, k, k, scale=0.1, causal=True, window=window, q_offset=q_offset, k_offset=0)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("variant,causal,window,softcap", [("ring", True, (700, 0), 50.0),
                                                           ("zigzag", True, (700, -1), 0.0),
                                                           ("stripe", True, (-1, -1), 30.0)])
def test_loopback_ring_with_flex_matches_oracle(variant, causal, window, softcap):
    world_size, seqlen, h, hk, d, dtype = 4, 4 * 512, 8, 2, 128, BF16
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2 ** 31 - 1, ()).item()))
    q, dout = (_randn(g, 1, seqlen, h, d, dtype=dtype) for _ in range(2))
    k, v = (_randn(g, 1, seqlen, hk, d, dtype=dtype) for _ in range(2))
    oracle = get_backend("reference")
    kw = dict(scale=d ** -0.5, causal=causal, window=window, softcap=softcap)
    ref_out, ref_lse = oracle.forward(q, k, v, **kw)
    ref_dq = oracle.backward(dout, q, k, v, ref_out, ref_lse, **kw)[0]
    layout = get_layout(variant)
    shard = lambda x, r, dim=1: layout.shard(x, r, world_size, dim)  # noqa: E731
    kv_by_rank = [torch.stack((shard(k, r), shard(v, r))).to(dtype) for r in range(world_size)]
    for rank in range(world_size):
        ql = shard(q, rank).to(dtype).requires_grad_()
        out, lse = ring_attention(ql, kv_by_rank[rank][0], kv_by_rank[rank][1], variant=variant, causal=causal,
                                  window_size=window, softcap=softcap, backend="flex",
                                  comm=LoopbackComm(rank, kv_by_rank))
        out.backward(shard(dout, rank).to(dtype))
        errors = (rel_err(out, shard(ref_out, rank)), rel_err(lse, shard(ref_lse, rank, 2)),
                  rel_err(ql.grad, shard(ref_dq, rank)))
        print(variant, window, softcap, rank, [f"{e:.2e}" for e in errors])
        assert errors[0] <= FORWARD[dtype] and errors[1] <= FORWARD[FP32] and errors[2] <= GRADIENT[dtype]


@pytest.mark.parametrize("variant,window,softcap", [("zigzag", (-1, -1), 0.0), ("ring", (300, -1), 30.0)])
def test_packed_batch_as_document_masked_calls_matches_oracle(variant, window, softcap):
    """A packed batch of many short sequences of mixed lengths: one compiled document-masked call per ring step
    (ring/documents.py), against each sequence's float64 oracle (out, LSE, dQ over the loopback)."""
    from ring_flash_attn.functional import serve_as_documents
    from ring_flash_attn.ring.layouts import PackedLayout
    from tests.distributed.workers import packed_oracle
    from tests.gpu.packed import check_packed_ranks

    world_size, h, hk, d, dtype = 4, 8, 2, 128, BF16
    unit = get_layout(variant).chunks_per_rank * world_size
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31 - 1, ()).item()))
    seqlens = tuple(unit * int(n) for n in torch.randint(1, 40, (48,), generator=gen))
    layout = PackedLayout(get_layout(variant), tuple(n // world_size for n in seqlens))
    assert serve_as_documents(layout, get_backend("flex"))
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2 ** 31 - 1, ()).item()))
    q, k, v, dout = (_randn(g, 1, sum(seqlens), heads, d, dtype=dtype) for heads in (h, hk, hk, h))
    ref = packed_oracle(q, k, v, dout, seqlens, causal=True, window=window, scale=d ** -0.5, softcap=softcap)
    check_packed_ranks(layout, world_size, (q, k, v, dout), ref, dtype, (variant, window, softcap),
                       window_size=window, softcap=softcap, backend="flex")


def test_soft_capped_bands_go_to_flex_and_other_bands_stay_with_triton():
    """Until a GPU measurement reorders BAND_PREFERENCE, flex serves only what triton cannot."""
    assert select_backend(Features("cuda", BF16, 128, band=True, softcap=True)).name == "flex"
    assert select_backend(Features("cuda", BF16, 128, softcap=True)).name == "flex"
    assert select_backend(Features("cuda", BF16, 128, band=True)).name == "triton"
