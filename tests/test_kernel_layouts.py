"""Every kernel backend that runs on the CPU, given tensors in layouts the fused kernels do not read as they are
(issue 25): head_dim at stride 2, a storage offset with heads before tokens in memory, head_dim expanded (stride
0), a strided LSE. Each must match the float64 oracle; the ring engines hand the user's q (and slices of it) to
the backends as it is. The GPU ops (FlashAttention-2, cuDNN, memory-efficient, XPU flash) and the flex backend's
compiled kernels go through the same normalisation (kernels/base.unit_stride_rows); they are not run here (no
device; on the CPU FlexAttention runs unfused and reads any layout)."""

import importlib.util
import os

import pytest
import torch

from ring_flash_attn.kernels import get_backend
from tests.distributed.api_hostile_workers import offset_heads_major, strided_head_dim
from tests.tolerances import FORWARD, GRADIENT, rel_err

SEED = int.from_bytes(os.urandom(4), "little")
# name -> mask arguments on a 24 x 24 block: PyTorch's is_causal, the stripe layout's shifted causal square
# (served as q[1:] against k[:-1]), and a band (a dense additive mask on the CPU).
MASKS = {"full": dict(causal=False, window=(-1, -1), q_offset=0, k_offset=0),
         "causal": dict(causal=True, window=(-1, -1), q_offset=0, k_offset=0),
         "shifted causal": dict(causal=True, window=(-1, -1), q_offset=0, k_offset=1),
         "band": dict(causal=False, window=(5, 3), q_offset=7, k_offset=0)}
SEQLEN, HEADS, HEADS_K, HEAD_DIM = 24, 4, 2, 16


def _backends():
    backends = [("reference", torch.float64), ("sdpa", torch.float64), ("sdpa", torch.bfloat16)]
    if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
        backends.append(("triton", torch.float32))
    return backends


def _expanded_head_dim(x):
    """``x``'s first head_dim value, expanded over head_dim (stride 0)."""
    return x[..., :1].expand(x.shape)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("name, dtype", _backends(), ids=lambda x: str(x).replace("torch.", ""))
def test_backend_reads_odd_layouts(name, dtype, mask):
    backend = get_backend(name)
    g = torch.Generator().manual_seed(SEED)
    randn = lambda h: torch.randn(1, SEQLEN, h, HEAD_DIM, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, dout = randn(HEADS), randn(HEADS_K), randn(HEADS)
    v = _expanded_head_dim(randn(HEADS_K)).contiguous()
    kw = dict(scale=HEAD_DIM ** -0.5, **MASKS[mask])
    reference = get_backend("reference")
    ref_out, ref_lse = reference.forward(q, k, v, **kw)
    ref_grads = reference.backward(dout, q, k, v, ref_out, ref_lse, **kw)

    low = lambda x: x.to(dtype)  # noqa: E731
    odd_q, odd_k, odd_v = strided_head_dim(low(q)), offset_heads_major(low(k)), _expanded_head_dim(low(v))
    out, lse = backend.forward(odd_q, odd_k, odd_v, **kw)
    assert rel_err(out, ref_out) <= FORWARD[dtype], "out"
    assert rel_err(lse, ref_lse) <= FORWARD[dtype], "lse"

    lse_strided = torch.empty(*ref_lse.shape[:-1], 2 * SEQLEN, dtype=lse.dtype)[..., ::2].copy_(ref_lse)
    grads = backend.backward(strided_head_dim(low(dout)), odd_q, odd_k, odd_v, strided_head_dim(low(ref_out)),
                             lse_strided, **kw)
    for grad_name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert rel_err(got, want) <= GRADIENT[dtype], grad_name
