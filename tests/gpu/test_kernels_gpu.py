"""Kernel backends on a CUDA device against the float64 oracle (run on the device machine).

sdpa is checked through each PyTorch op it can take (cuDNN, FlashAttention-2,
the memory-efficient op with a band bias, float32), triton through its
compiled kernels. Tolerances: tests/tolerances.py.
"""

import pytest
import torch

from ring_flash_attn.kernels import Features, available_backends, get_backend, select_backend
from ring_flash_attn.merge import merge_into, merge_into_eager
from tests.tolerances import FORWARD, GRADIENT, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
PLAIN = dict(causal=False, window=(-1, -1), q_offset=0, k_offset=0)
CAUSAL = dict(causal=True, window=(-1, -1), q_offset=0, k_offset=0)
CAUSAL_OFFSET = dict(causal=True, window=(-1, -1), q_offset=384, k_offset=0)   # query block later: a band
WINDOW = dict(causal=False, window=(100, 37), q_offset=64, k_offset=0)
EMPTY_ROWS = dict(causal=True, window=(-1, -1), q_offset=0, k_offset=200)     # first rows see nothing
STRICT_CAUSAL = dict(causal=True, window=(-1, -1), q_offset=-1, k_offset=0)   # stripe: keys j < i, fused causal op

# (backend, sdpa op or None, dtype, head_dim, heads, heads_k, seqlen_q, seqlen_k, mask)
CASES = []
for op in ("cudnn", "flash"):
    for dtype in (BF16, FP16):
        CASES += [("sdpa", op, dtype, 128, 8, 2, 512, 768, PLAIN), ("sdpa", op, dtype, 64, 8, 8, 640, 640, CAUSAL),
                  ("sdpa", op, dtype, 128, 8, 2, 640, 640, STRICT_CAUSAL)]
# Half-precision bands: sdpa declines them (test_sdpa_declines_half_precision_bands), triton serves them.
CASES += [("sdpa", None, FP32, 128, 8, 2, 500, 700, m) for m in (CAUSAL_OFFSET, WINDOW, EMPTY_ROWS)]
CASES += [("sdpa", None, FP32, 64, 4, 4, 300, 300, PLAIN)]
CASES += [("triton", None, dt, d, 8, 2, 500, 700, m) for dt in (BF16, FP16, FP32) for d in (64, 128)
          for m in (PLAIN, CAUSAL_OFFSET, WINDOW, EMPTY_ROWS)]
CASES += [("triton", None, BF16, 128, 4, 4, 640, 640, CAUSAL)]
# One-token blocks (a packed sequence of one token per rank): cuDNN's backward refuses 1 x 1, FA2 serves them.
CASES += [("sdpa", "cudnn", dt, 128, 8, 2, 1, 1, m) for dt in (BF16, FP16) for m in (PLAIN, CAUSAL)]


def _id(case):
    backend, op, dtype, d, h, hk, sq, sk, mask = case
    name = backend + (f"-{op}" if op else "")
    return f"{name}-{str(dtype)[6:]}-d{d}-h{h}/{hk}-{sq}x{sk}-c{int(mask['causal'])}-w{mask['window']}-o{mask['q_offset']},{mask['k_offset']}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_backend_matches_oracle(case, monkeypatch):
    backend_name, op, dtype, d, h, hk, sq, sk, mask = case
    if backend_name not in available_backends():
        pytest.fail(f"backend {backend_name!r} is not registered (is triton installed?)")
    if op:
        monkeypatch.setenv("RING_FLASH_ATTN_SDPA_OP", op)
    backend, oracle = get_backend(backend_name), get_backend("reference")
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2 ** 31 - 1, ()).item()))

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=g, dtype=torch.float64).to(dtype)

    q, k, v, dout = randn(1, sq, h, d), randn(1, sk, hk, d), randn(1, sk, hk, d), randn(1, sq, h, d)
    kw = dict(scale=d ** -0.5, **mask)
    out, lse = backend.forward(q, k, v, **kw)
    ref_out, ref_lse = oracle.forward(q.double(), k.double(), v.double(), **kw)
    errors = {"out": rel_err(out, ref_out), "lse": rel_err(lse, ref_lse)}
    grads = backend.backward(dout, q, k, v, ref_out.to(dtype), ref_lse.float(), **kw)
    ref_grads = oracle.backward(dout.double(), q.double(), k.double(), v.double(), ref_out, ref_lse, **kw)
    errors.update({n: rel_err(x, r) for n, x, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    print(_id(case), {n: f"{e:.2e}" for n, e in errors.items()})
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert errors["out"] <= FORWARD[dtype] and errors["lse"] <= FORWARD[FP32]
    for n in ("dq", "dk", "dv"):
        assert errors[n] <= GRADIENT[dtype], n


@pytest.mark.parametrize("dtype", (BF16, FP32))
def test_triton_forward_accumulate_and_fused_merge(dtype):
    """The two ring steps (fold in the kernel / cuDNN-style output + fused merge) against the eager merge."""
    torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, ()).item()))
    b, s, h, hk, d = 1, 777, 8, 2, 128
    q = torch.randn(b, s, h, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(b, s, hk, d, device="cuda", dtype=dtype) for _ in range(2))
    out_acc = torch.randn(b, s, h, d, device="cuda")
    lse_acc = torch.randn(b, h, s, device="cuda")
    lse_acc[:, :, :100] = float("-inf")
    out_acc[:, :100] = 0
    kw = dict(scale=d ** -0.5, **CAUSAL_OFFSET)
    ref_out, ref_lse = get_backend("reference").forward(q.double(), k.double(), v.double(), **kw)
    want_out, want_lse = out_acc.double(), lse_acc.double()
    merge_into_eager(want_out, want_lse, ref_out, ref_lse)

    fused_out, fused_lse = out_acc.clone(), lse_acc.clone()
    get_backend("triton").forward_accumulate(q, k, v, fused_out, fused_lse, **kw)
    assert rel_err(fused_out, want_out) <= FORWARD[dtype] and rel_err(fused_lse, want_lse) <= FORWARD[FP32]

    merged_out, merged_lse = out_acc.clone(), lse_acc.clone()
    merge_into(merged_out, merged_lse, ref_out.to(dtype), ref_lse.float())  # the Triton merge on CUDA
    assert rel_err(merged_out, want_out) <= FORWARD[dtype] and rel_err(merged_lse, want_lse) <= FORWARD[FP32]


def test_sdpa_declines_half_precision_bands_and_triton_takes_them():
    """The memory-efficient op's half-precision backward is wrong given an outside LSE (torch 2.11, H100)."""
    band = Features("cuda", BF16, 128, band=True)
    assert "memory-efficient" in get_backend("sdpa").unsupported_reason(band)
    assert select_backend(band).name == "triton"
    assert select_backend(Features("cuda", BF16, 128)).name == "sdpa"
    assert select_backend(Features("cuda", FP32, 128)).name == "sdpa"
