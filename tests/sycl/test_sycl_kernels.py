"""The SYCL kernels (CPU test build) through the ``sycl`` backend, against the float64 reference."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from ring_flash_attn.kernels import get_backend, select_backend
from ring_flash_attn.kernels.base import Features
from ring_flash_attn.kernels.reference import ReferenceBackend
from ring_flash_attn.merge import merge_into, new_accumulators
from tests.tolerances import FORWARD, GRADIENT, rel_err

pytestmark = pytest.mark.usefixtures("sycl_cpu_build")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [64, 128]

# name: (seqlen_q, seqlen_k, heads, heads_k, mask arguments); lengths are not tile multiples.
CASES = {
    "full": (33, 47, 2, 2, dict()),
    "single_row": (1, 19, 2, 1, dict()),
    "causal_gqa": (80, 80, 4, 1, dict(causal=True)),
    "causal_offsets": (29, 61, 4, 2, dict(causal=True, q_offset=40, k_offset=16)),
    "causal_rows_without_keys": (24, 40, 2, 1, dict(causal=True, q_offset=0, k_offset=10)),
    "window": (50, 70, 2, 2, dict(window=(9, 4), q_offset=10)),
    "causal_window_rows_without_keys": (45, 30, 2, 2, dict(causal=True, window=(6, -1), q_offset=20)),
    "softcap": (37, 53, 4, 2, dict(causal=True, softcap=8.0)),
}

# One key: softmax of a single score, whose gradient is exactly 0, so relative errors of dq/dk
# would measure only the reference's rounding; forward only.
FORWARD_CASES = dict(CASES, single_key=(19, 1, 2, 1, dict(causal=True, q_offset=3)))

reference = ReferenceBackend()


@pytest.fixture(autouse=True)
def fresh_seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def sycl():
    return get_backend("sycl")


def make_inputs(dtype, head_dim, seqlen_q, seqlen_k, heads, heads_k, batch=2):
    q = torch.randn(batch, seqlen_q, heads, head_dim, dtype=dtype)
    k = torch.randn(batch, seqlen_k, heads_k, head_dim, dtype=dtype)
    v = torch.randn(batch, seqlen_k, heads_k, head_dim, dtype=dtype)
    return q, k, v


def check_close(error_log, name, actual, expected, dtype, tolerance):
    """Relative error against the float64 reference within ``tolerance[dtype]`` (tests/tolerances.py).

    Rows that see no key must reproduce -inf exactly (rel_err is inf otherwise). The
    largest error per (dtype, quantity) is printed after the run.
    """
    error = rel_err(actual, expected)
    key = (str(dtype).replace("torch.", ""), name)
    error_log[key] = max(error_log.get(key, 0.0), error)
    assert error <= tolerance[dtype], f"{name}: relative error {error:.3e} exceeds {tolerance[dtype]:.1e} for {dtype}"


def reference_forward(q, k, v, scale, mask):
    return reference.forward(q.double(), k.double(), v.double(), scale=scale, **mask)


@pytest.mark.parametrize("case", list(FORWARD_CASES))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_reference(sycl, error_log, dtype, head_dim, case):
    seqlen_q, seqlen_k, heads, heads_k, mask = FORWARD_CASES[case]
    q, k, v = make_inputs(dtype, head_dim, seqlen_q, seqlen_k, heads, heads_k)
    scale = 1.0 / math.sqrt(head_dim)
    out, lse = sycl.forward(q, k, v, scale=scale, **mask)
    ref_out, ref_lse = reference_forward(q, k, v, scale, mask)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], heads, seqlen_q)
    check_close(error_log, "forward out", out, ref_out, dtype, FORWARD)
    check_close(error_log, "forward lse", lse, ref_lse, dtype, FORWARD)
    # A row that sees no key: out exactly 0 and lse -inf (checked above for lse).
    no_key = torch.isinf(ref_lse)
    assert bool((out.transpose(1, 2)[no_key] == 0).all())


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_reference(sycl, error_log, dtype, head_dim, case):
    seqlen_q, seqlen_k, heads, heads_k, mask = CASES[case]
    q, k, v = make_inputs(dtype, head_dim, seqlen_q, seqlen_k, heads, heads_k)
    dout = torch.randn_like(q)
    scale = 1.0 / math.sqrt(head_dim)
    ref_out, ref_lse = reference_forward(q, k, v, scale, mask)
    out = ref_out.to(dtype)  # the global out/lse, as the ring engine passes them
    grads = sycl.backward(dout, q, k, v, out, ref_lse.float(), scale=scale, **mask)
    ref_grads = reference.backward(dout.double(), q.double(), k.double(), v.double(), out.double(), ref_lse,
                                   scale=scale, **mask)
    for name, grad, ref_grad, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert grad.dtype == dtype and grad.shape == x.shape
        check_close(error_log, f"backward {name}", grad, ref_grad, dtype, GRADIENT)


@pytest.mark.parametrize("case", ["causal_rows_without_keys", "window", "softcap"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_with_float32_global_out(sycl, error_log, dtype, case):
    """The ring keeps its running out in float32; the backward takes it as the global out."""
    seqlen_q, seqlen_k, heads, heads_k, mask = CASES[case]
    q, k, v = make_inputs(dtype, 64, seqlen_q, seqlen_k, heads, heads_k)
    dout = torch.randn_like(q)
    ref_out, ref_lse = reference_forward(q, k, v, 0.125, mask)
    grads = sycl.backward(dout, q, k, v, ref_out.float(), ref_lse.float(), scale=0.125, **mask)
    ref_grads = reference.backward(dout.double(), q.double(), k.double(), v.double(), ref_out.float().double(),
                                   ref_lse, scale=0.125, **mask)
    for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads):
        check_close(error_log, f"backward {name}", grad, ref_grad, dtype, GRADIENT)


@pytest.mark.parametrize("case", ["causal_offsets", "causal_rows_without_keys", "window", "softcap"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_accumulate_matches_forward_then_merge(sycl, error_log, dtype, head_dim, case):
    """Fold two key blocks into float32 accumulators that are views into a larger buffer."""
    seqlen_q, seqlen_k, heads, heads_k, mask = CASES[case]
    q, k, v = make_inputs(dtype, head_dim, seqlen_q, seqlen_k, heads, heads_k)
    _, k2, v2 = make_inputs(dtype, head_dim, seqlen_q, seqlen_k, heads, heads_k)
    scale = 1.0 / math.sqrt(head_dim)
    # The second block sits further left: a different band for the same rows.
    mask2 = dict(mask, k_offset=mask.get("k_offset", 0) - 7)

    pad = 3
    big_out = torch.full((q.shape[0], seqlen_q + 2 * pad, heads, head_dim), float("nan"))
    big_lse = torch.full((q.shape[0], heads, seqlen_q + 2 * pad), float("nan"))
    out_acc, lse_acc = big_out[:, pad:pad + seqlen_q], big_lse[:, :, pad:pad + seqlen_q]
    fresh_out, fresh_lse = new_accumulators(q)
    out_acc.copy_(fresh_out)
    lse_acc.copy_(fresh_lse)
    sycl.forward_accumulate(q, k, v, out_acc, lse_acc, scale=scale, **mask)
    sycl.forward_accumulate(q, k2, v2, out_acc, lse_acc, scale=scale, **mask2)

    ref_out_acc, ref_lse_acc = new_accumulators(q.double())
    for kb, vb, m in ((k, v, mask), (k2, v2, mask2)):
        merge_into(ref_out_acc, ref_lse_acc, *reference_forward(q, kb, vb, scale, m))
    check_close(error_log, "forward_accumulate out", out_acc, ref_out_acc, dtype, FORWARD)
    check_close(error_log, "forward_accumulate lse", lse_acc, ref_lse_acc, dtype, FORWARD)
    assert bool(big_out[:, :pad].isnan().all() and big_out[:, pad + seqlen_q:].isnan().all()), "wrote outside the view"
    assert bool(big_lse[..., :pad].isnan().all() and big_lse[..., pad + seqlen_q:].isnan().all())

    # Same result as the contract's default: forward, then merge (up to rounding the block's out to dtype).
    default_out, default_lse = new_accumulators(q)
    for kb, vb, m in ((k, v, mask), (k2, v2, mask2)):
        merge_into(default_out, default_lse, *sycl.forward(q, kb, vb, scale=scale, **m))
    check_close(error_log, "forward+merge out", default_out, ref_out_acc, dtype, FORWARD)
    assert rel_err(lse_acc, default_lse) <= FORWARD[torch.float32]  # both paths keep the lse in float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_output_rounding_matches_torch(sycl, dtype):
    """Equal scores over two keys give out = (v0 + v1) / 2, exact in float32: its rounding to
    dtype (round to nearest even, with many ties) must be bit-identical to torch's."""
    q, k, v = make_inputs(dtype, 128, 40, 2, 2, 2)
    out, _ = sycl.forward(q.zero_(), k, v, scale=1.0)
    expected = ((v[:, 0].float() + v[:, 1].float()) / 2).to(dtype).unsqueeze(1).expand_as(out)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_views_of_packed_qkv(sycl, error_log, dtype):
    batch, seqlen, heads, head_dim = 2, 41, 2, 64
    qkv = torch.randn(batch, seqlen, 3, heads, head_dim, dtype=dtype)
    q, k, v = qkv.unbind(dim=2)  # views with a sequence stride of 3 * heads * head_dim
    # head_dim not contiguous: the op makes such inputs contiguous first.
    v = v.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not q.is_contiguous() and v.stride(-1) != 1
    mask = dict(causal=True, window=(12, -1))
    out, lse = sycl.forward(q, k, v, scale=0.125, **mask)
    ref_out, ref_lse = reference_forward(q, k, v, 0.125, mask)
    check_close(error_log, "forward out", out, ref_out, dtype, FORWARD)
    check_close(error_log, "forward lse", lse, ref_lse, dtype, FORWARD)
    dout = torch.randn(batch, heads, seqlen, head_dim, dtype=dtype).transpose(1, 2)  # strided dout
    grads = sycl.backward(dout, q, k, v, ref_out.to(dtype), ref_lse.float(), scale=0.125, **mask)
    ref_grads = reference.backward(dout.double(), q.double(), k.double(), v.double(), ref_out.to(dtype).double(),
                                   ref_lse, scale=0.125, **mask)
    for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads):
        check_close(error_log, f"backward {name}", grad, ref_grad, dtype, GRADIENT)


def test_autograd_including_lse_gradient(error_log):
    """The seed API is differentiable through out and lse; gradients match float64 autograd."""
    from ring_flash_attn.intel_flash_attn_sycl import intel_flash_attn_forward_sycl, is_sycl_available

    assert is_sycl_available()
    q, k, v = (x.requires_grad_() for x in make_inputs(torch.float32, 128, 35, 35, 4, 2))
    out, lse = intel_flash_attn_forward_sycl(q, k, v, causal=True, window_size=(10, -1), softcap=6.0)
    w_out, w_lse = torch.randn_like(out), torch.randn_like(lse)
    ((out * w_out).sum() + (lse * w_lse).sum()).backward()

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = reference.forward(q64, k64, v64, scale=128 ** -0.5, causal=True, window=(10, -1), softcap=6.0)
    ((ref_out * w_out.double()).sum() + (ref_lse * w_lse.double()).sum()).backward()
    for name, x, x64 in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        check_close(error_log, f"autograd {name}", x.grad, x64.grad, torch.float32, GRADIENT)


def test_seed_backward_api(error_log):
    from ring_flash_attn.intel_flash_attn_sycl import intel_flash_attn_backward_sycl

    q, k, v = make_inputs(torch.float16, 64, 30, 30, 2, 2)
    dout = torch.randn_like(q)
    ref_out, ref_lse = reference.forward(q.double(), k.double(), v.double(), scale=0.1, window=(5, 5))
    grads = intel_flash_attn_backward_sycl(dout, q, k, v, ref_out.half(), ref_lse, softmax_scale=0.1,
                                           window_size=(5, 5))
    ref_grads = reference.backward(dout.double(), q.double(), k.double(), v.double(), ref_out.half().double(),
                                   ref_lse, scale=0.1, window=(5, 5))
    for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads):
        check_close(error_log, f"backward {name}", grad, ref_grad, torch.float16, GRADIENT)


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(5, 0), (0, 7)])
def test_empty_sequences(sycl, seqlen_q, seqlen_k):
    q, k, v = make_inputs(torch.float32, 64, seqlen_q, seqlen_k, 2, 1)
    out, lse = sycl.forward(q, k, v, scale=0.125, causal=True)
    assert bool((out == 0).all()) and bool((lse == float("-inf")).all())
    out_acc, lse_acc = new_accumulators(q)
    sycl.forward_accumulate(q, k, v, out_acc, lse_acc, scale=0.125)
    assert bool((out_acc == 0).all()) and bool((lse_acc == float("-inf")).all())
    dq, dk, dv = sycl.backward(torch.randn_like(q), q, k, v, out, lse, scale=0.125, causal=True)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert bool((dq == 0).all()) and bool((dk == 0).all()) and bool((dv == 0).all())


def test_torch_compile_traces_through_the_ops():
    from ring_flash_attn.intel_flash_attn_sycl import intel_flash_attn_forward_sycl

    q, k, v = (x.requires_grad_() for x in make_inputs(torch.float16, 64, 20, 26, 2, 1))

    def loss(q, k, v):
        out, lse = intel_flash_attn_forward_sycl(q, k, v, causal=True)
        return out.float().square().sum() + lse.sum()

    eager = loss(q, k, v)
    eager_grads = torch.autograd.grad(eager, (q, k, v))
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(q, k, v)
    compiled_grads = torch.autograd.grad(compiled, (q, k, v))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_op_registrations_pass_opcheck():
    ops = torch.ops.ring_flash_attn_sycl
    q, k, v = make_inputs(torch.float32, 64, 9, 13, 2, 1, batch=1)
    mask = (0.125, True, -1, -1, 4, 0, 0.0)
    torch.library.opcheck(ops.fwd, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *mask))
    out, lse = ops.fwd(q, k, v, *mask)
    out_acc, lse_acc = new_accumulators(q)
    torch.library.opcheck(ops.fwd_accumulate, (q.detach(), k.detach(), v.detach(), out_acc, lse_acc, *mask))
    torch.library.opcheck(ops.bwd, (torch.randn_like(q), q.detach(), k.detach(), v.detach(), out.detach(),
                                    lse.detach(), None, *mask))


def test_unsupported_calls_say_why(sycl):
    reason = sycl.unsupported_reason(Features("cpu", torch.float32, 96))
    assert reason and "head_dim" in reason and "96" in reason
    assert "float64" in sycl.unsupported_reason(Features("cpu", torch.float64, 64))
    assert "xpu" in sycl.unsupported_reason(Features("xpu", torch.float32, 64))  # this build serves CPU tensors
    assert sycl.unsupported_reason(Features("cpu", torch.bfloat16, 128, band=True, softcap=True)) is None
    assert select_backend(Features("cpu", torch.float16, 64, band=True), name="sycl") is sycl
    q, k, v = make_inputs(torch.float32, 96, 4, 4, 1, 1)
    with pytest.raises(RuntimeError, match="head_dim: .*got 96"):
        sycl.forward(q, k, v, scale=0.1)
    q, k, v = make_inputs(torch.float32, 64, 4, 4, 3, 2)
    with pytest.raises(RuntimeError, match="heads_k"):
        sycl.forward(q, k, v, scale=0.1)
