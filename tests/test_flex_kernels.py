"""The flex backend (PyTorch's FlexAttention) on the CPU against the float64 oracle.

FlexAttention runs on the CPU unfused and PyTorch refuses its backward there
(``torch.nn.attention.flex_attention._validate_device``), so the backend
declines the CPU. Here both limits are lifted for the test only: the device
check is replaced by one that passes detached tensors (the other checks stay),
and a subclass that accepts the CPU is registered as ``flex-cpu-test``. What
runs is the backend's own code over FlexAttention's own (unfused) forward and
backward; the compiled GPU kernels are checked in tests/gpu/test_flex_gpu.py.
"""

from __future__ import annotations

import contextlib
import itertools
import dataclasses
import os

import pytest
import torch

import ring_flash_attn.kernels as kernels
from ring_flash_attn import ring_attention
from ring_flash_attn.comm.loopback import LoopbackComm
from ring_flash_attn.kernels import Features, get_backend, select_backend
from ring_flash_attn.kernels.flex import FlexBackend
from ring_flash_attn.merge import merge_into, merge_into_eager, new_accumulators
from ring_flash_attn.ring.layouts import get_layout
from tests.distributed.harness import run_world
from tests.distributed.workers import make_inputs, oracle, ring_errors
from tests.tolerances import FORWARD, GRADIENT, rel_err

# FlexAttention warns that it runs unfused without torch.compile: on the CPU that is the point.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

SEED = int.from_bytes(os.urandom(4), "little")
CPU_TEST_NAME = "flex-cpu-test"


class CpuFlexForTests(FlexBackend):
    """The flex backend with the CPU accepted (tests only: see the module docstring)."""

    name = CPU_TEST_NAME

    def unsupported_reason(self, f: Features):
        return super().unsupported_reason(dataclasses.replace(f, device_type="cuda"))


@contextlib.contextmanager
def cpu_flex(patch: pytest.MonkeyPatch):
    """Lift FlexAttention's refusal of CPU autograd and register :class:`CpuFlexForTests`."""
    import torch.nn.attention.flex_attention as flex_module

    check = flex_module._validate_device

    def validate_detached(q, k, v):
        check(q.detach(), k.detach(), v.detach())

    patch.setattr(flex_module, "_validate_device", validate_detached)
    patch.setitem(kernels._REGISTRY, CPU_TEST_NAME, CpuFlexForTests())
    yield get_backend(CPU_TEST_NAME)


@pytest.fixture(scope="module")
def flex():
    with pytest.MonkeyPatch.context() as patch, cpu_flex(patch) as backend:
        yield backend


# name -> mask arguments. Sizes below: 40 query rows, 56 key rows unless a case says otherwise.
MASKS = {
    "causal-q-later": dict(causal=True, window=(-1, -1), q_offset=24, k_offset=0),
    "causal-empty-rows": dict(causal=True, window=(-1, -1), q_offset=0, k_offset=20),   # rows 0..19 see nothing
    "window-both-sides": dict(causal=False, window=(7, 5), q_offset=30, k_offset=0),
    "causal-window": dict(causal=True, window=(9, -1), q_offset=16, k_offset=0),
    "left-window-only": dict(causal=False, window=(3, -1), q_offset=0, k_offset=10),
    "full": dict(causal=False, window=(-1, -1), q_offset=0, k_offset=0),               # no block mask at all
}
# (mask, dtype, heads, heads_k, seqlen_q, seqlen_k, softcap)
CASES = [(m, torch.float32, 4, 2, 40, 56, 0.0) for m in MASKS]
CASES += [("window-both-sides", torch.float32, 4, 2, 40, 56, 5.0),
          ("causal-empty-rows", torch.float32, 4, 1, 40, 56, 3.0),    # MQA
          ("causal-window", torch.float32, 2, 2, 33, 33, 0.0),
          ("causal-q-later", torch.float32, 4, 1, 56, 24, 0.0),
          ("causal-window", torch.bfloat16, 4, 2, 40, 56, 0.0),
          ("window-both-sides", torch.bfloat16, 4, 1, 40, 56, 5.0)]
HEAD_DIM = 16


def _case_id(case):
    mask, dtype, h, hk, sq, sk, softcap = case
    return f"{mask}-{str(dtype)[6:]}-h{h}/{hk}-{sq}x{sk}" + (f"-softcap{softcap:g}" if softcap else "")


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _global_stats(ref_out, ref_lse, g):
    """The ring's global out/LSE: this block merged with a random other block seen by the same rows."""
    out_acc, lse_acc = new_accumulators(ref_out)
    merge_into_eager(out_acc, lse_acc, ref_out, ref_lse)
    merge_into_eager(out_acc, lse_acc, _randn(g, *ref_out.shape), _randn(g, *ref_lse.shape))
    return out_acc, lse_acc


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_accumulate_and_backward_match_oracle(flex, case):
    mask, dtype, h, hk, sq, sk, softcap = case
    g = torch.Generator().manual_seed(SEED)
    q, k, v, dout = _randn(g, 1, sq, h, HEAD_DIM), _randn(g, 1, sk, hk, HEAD_DIM), _randn(g, 1, sk, hk, HEAD_DIM), \
        _randn(g, 1, sq, h, HEAD_DIM)
    kw = dict(scale=HEAD_DIM ** -0.5, softcap=softcap, **MASKS[mask])
    reference = get_backend("reference")
    ref_out, ref_lse = reference.forward(q, k, v, **kw)
    low = [x.to(dtype) for x in (q, k, v, dout)]

    out, lse = flex.forward(*low[:3], **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert rel_err(out, ref_out) < FORWARD[dtype], "out"
    assert rel_err(lse, ref_lse) < FORWARD[dtype], "lse"  # also: -inf exactly where the oracle has it
    if mask == "causal-empty-rows":
        assert bool((lse[:, :, :20] == float("-inf")).all()) and bool((out[:, :20] == 0).all())

    # forward_accumulate folds the block into accumulators that already hold another block.
    glob_out, glob_lse = _global_stats(ref_out, ref_lse, g)
    acc_out, acc_lse = new_accumulators(low[0])
    merge_into(acc_out, acc_lse, glob_out.float(), glob_lse.float())  # start from the global result ...
    flex.forward_accumulate(*low[:3], acc_out, acc_lse, **kw)          # ... fold the block in once more
    want_out, want_lse = new_accumulators(q)
    merge_into_eager(want_out, want_lse, glob_out, glob_lse)
    merge_into_eager(want_out, want_lse, ref_out, ref_lse)
    assert rel_err(acc_out, want_out) < FORWARD[dtype] and rel_err(acc_lse, want_lse) < FORWARD[dtype], \
        "forward_accumulate"

    grads = flex.backward(low[3], *low[:3], glob_out.to(dtype), glob_lse.float(), **kw)
    ref_grads = reference.backward(dout, q, k, v, glob_out, glob_lse, **kw)
    for name, got, want, x in zip(("dq", "dk", "dv"), grads, ref_grads, low[:3]):
        assert got.dtype == x.dtype and got.shape == x.shape, name
        assert rel_err(got, want) < GRADIENT[dtype], name


def test_empty_band_launches_nothing(flex):
    q, k = torch.randn(1, 8, 2, HEAD_DIM), torch.randn(1, 8, 2, HEAD_DIM)
    kw = dict(scale=0.25, causal=True, window=(-1, -1), q_offset=0, k_offset=8)  # every key after every query
    out, lse = flex.forward(q, k, k, **kw)
    assert bool((out == 0).all()) and bool((lse == float("-inf")).all())
    dq, dk, dv = flex.backward(torch.randn_like(q), q, k, k, out, lse, **kw)
    assert all(bool((x == 0).all()) for x in (dq, dk, dv))


@pytest.mark.parametrize("features, reason", [
    (Features("cpu", torch.bfloat16, 128, band=True), "FlexAttention on the CPU runs unfused"),
    (Features("cuda", torch.float64, 128, band=True), "float16, bfloat16 or float32, got torch.float64"),
    (Features("cuda", torch.bfloat16, 8, band=True), "16 <= head_dim <= 256, got 8"),
    (Features("cuda", torch.bfloat16, 128, band=True, alibi=True), "ALiBi"),
])
def test_unsupported_reasons(features, reason):
    assert reason in FlexBackend().unsupported_reason(features)


def test_preference_puts_flex_after_triton_and_before_the_oracle():
    soft_capped_band = Features("cuda", torch.bfloat16, 128, band=True, softcap=True)
    assert get_backend("flex").unsupported_reason(soft_capped_band) is None
    band = kernels.BAND_PREFERENCE["cuda"]
    assert band.index("flex") == band.index("triton") + 1 and band[-1] == "reference"
    assert kernels.PREFERENCE["cuda"][:2] == ("sdpa", "flex")
    with pytest.raises(NotImplementedError, match="backend: 'flex' cannot serve this call: FlexAttention on the CPU"):
        select_backend(Features("cpu", torch.float32, 16, band=True), "flex")


# -- the ring engine end to end


# zigzag runs on the gloo ranks below (it has the most block shapes, each a trace of its own here).
RING_CASES = [
    dict(variant="ring", causal=False, window=(9, 4), softcap=4.0, dtype=torch.float32),
    dict(variant="ring", causal=True, window=(11, -1), softcap=0.0, dtype=torch.float32),
    dict(variant="stripe", causal=True, window=(-1, -1), softcap=3.0, dtype=torch.bfloat16),
]


@pytest.mark.parametrize("case", RING_CASES, ids=lambda c: f"{c['variant']}-w{c['window']}-cap{c['softcap']:g}")
def test_ring_over_loopback_matches_oracle(flex, case):
    """Every rank's schedule of a P = 3 ring on one process: out, LSE and dQ (the loopback's dK/dV are stand-ins)."""
    world_size, dtype = 3, case["dtype"]
    inputs = dict(seed=SEED, batch=1, seqlen=36, heads=4, heads_k=2, head_dim=HEAD_DIM)
    q, k, v, dout = make_inputs(inputs)
    kw = dict(causal=case["causal"], window=case["window"], softcap=case["softcap"], scale=HEAD_DIM ** -0.5)
    ref = oracle(q, k, v, dout, **kw)
    layout = get_layout(case["variant"])
    kv_by_rank = [torch.stack((layout.shard(k, r, world_size), layout.shard(v, r, world_size))).to(dtype)
                  for r in range(world_size)]
    for rank in range(world_size):
        ql = layout.shard(q, rank, world_size).to(dtype).requires_grad_()
        out, lse = ring_attention(ql, kv_by_rank[rank][0], kv_by_rank[rank][1], variant=case["variant"],
                                  causal=case["causal"], window_size=case["window"], softcap=case["softcap"],
                                  backend=CPU_TEST_NAME, comm=LoopbackComm(rank, kv_by_rank))
        out.backward(layout.shard(dout, rank, world_size).to(dtype))
        for name, got, want, tol in (("out", out, layout.shard(ref[0], rank, world_size), FORWARD),
                                     ("lse", lse, layout.shard(ref[1], rank, world_size, 2), FORWARD),
                                     ("dq", ql.grad, layout.shard(ref[2], rank, world_size), GRADIENT)):
            assert rel_err(got, want) < tol[dtype], f"rank {rank}: {name}"


@pytest.mark.parametrize("variant, causal, window, softcap", [
    ("zigzag", True, (-1, -1), 0.0), ("ring", False, (5, 3), 2.0), ("stripe", True, (7, -1), 0.0)])
def test_packed_batch_is_one_document_masked_call_per_step(flex, variant, causal, window, softcap):
    """Many sequences of mixed lengths (zero-length ones too): each ring step one call under a document mask,
    against the float64 oracle of each sequence on its own (out, LSE, dQ over the loopback)."""
    from ring_flash_attn.functional import serve_as_documents
    from ring_flash_attn.ring.layouts import PackedLayout
    from tests.distributed.workers import packed_oracle

    world_size = 3
    unit = get_layout(variant).chunks_per_rank * world_size
    seqlens = tuple(unit * n for n in (1, 3, 0, 2, 1, 1, 4, 2))
    layout = PackedLayout(get_layout(variant), tuple(n // world_size for n in seqlens))
    assert serve_as_documents(layout, flex)
    inputs = make_inputs(dict(seed=SEED + 3, batch=1, seqlen=sum(seqlens), heads=4, heads_k=2, head_dim=HEAD_DIM))
    kw = dict(causal=causal, window=window, softcap=softcap, scale=HEAD_DIM ** -0.5)
    ref = packed_oracle(*inputs, seqlens, **kw)
    kv_by_rank = [torch.stack((layout.shard(inputs[1], r, world_size), layout.shard(inputs[2], r, world_size))).float()
                  for r in range(world_size)]
    cu = torch.tensor([0, *itertools.accumulate(layout.seqlens_local)], dtype=torch.int32)
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(flex), "forward_accumulate", lambda *a, **k: calls.append("block"))
        for rank in range(world_size):
            ql = layout.shard(inputs[0], rank, world_size).float().requires_grad_()
            out, lse = ring_attention(ql[0], kv_by_rank[rank][0][0], kv_by_rank[rank][1][0], variant=variant,
                                      causal=causal, window_size=window, softcap=softcap, cu_seqlens=cu,
                                      backend=CPU_TEST_NAME, comm=LoopbackComm(rank, kv_by_rank))
            out.backward(layout.shard(inputs[3], rank, world_size)[0].float())
            for name, got, want, tol in (("out", out, layout.shard(ref[0], rank, world_size)[0], FORWARD),
                                         ("lse", lse, layout.shard(ref[1], rank, world_size, 2)[0], FORWARD),
                                         ("dq", ql.grad[0], layout.shard(ref[2], rank, world_size)[0], GRADIENT)):
                assert rel_err(got, want) < tol[torch.float32], f"rank {rank}: {name}"
    assert calls == [], "a packed batch went through per-block calls"


def _gloo_flex_errors(rank, world_size, cases):
    with pytest.MonkeyPatch.context() as patch, cpu_flex(patch):
        return ring_errors(rank, world_size, cases)


def test_ring_on_gloo_ranks_matches_oracle_with_dk_dv():
    """A real two-rank ring, so the dK/dV that travel back around it are checked too; the packed cases are
    served as one document-masked call per step (ring/documents.py)."""
    base = dict(dtype="float32", backend=CPU_TEST_NAME, seed=SEED, batch=1, seqlen=32, heads=4, heads_k=2,
                head_dim=HEAD_DIM)
    cases = [dict(base, variant="zigzag", causal=True, window=(13, -1), softcap=5.0),
             dict(base, variant="zigzag", causal=True, seqlens=(8, 4, 0, 12, 8, 4, 24), window=(6, -1), softcap=3.0,
                  seed=SEED + 1),
             dict(base, variant="ring", causal=False, seqlens=(2, 6, 2, 10, 4), window=(3, 2), seed=SEED + 2)]
    for rank, errors in enumerate(run_world(2, _gloo_flex_errors, cases)):
        for name, err in errors[0].items():
            tol = FORWARD if name in ("out", "lse") else GRADIENT
            assert err < tol[torch.float32], f"rank {rank}: {name} error {err:.2e}"
