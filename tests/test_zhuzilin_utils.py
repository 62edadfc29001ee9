"""zhuzilin/ring-flash-attention's ``ring_flash_attn.utils`` and ``ring_flash_attn.triton_utils`` helpers that need
no process group, in that project's layouts, against float64 references. (RingComm and AllGatherComm run in the
multi-rank worlds: tests/integrations/test_zhuzilin_compat.py.)"""

import pytest
import torch

from ring_flash_attn.kernels import get_backend
from ring_flash_attn.triton_utils import flatten_varlen_lse as flatten_at_triton_utils
from ring_flash_attn.utils import flatten_varlen_lse, get_default_args, unflatten_varlen_lse, update_out_and_lse
from tests.tolerances import FORWARD, rel_err

REFERENCE = get_backend("reference")
TOL = FORWARD[torch.float64]


def _blocks(seed, batch=2, seqlen=6, keys=(3, 5, 4), heads=2, dim=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen, heads, dim, generator=g, dtype=dtype)
    kv = [(torch.randn(batch, n, heads, dim, generator=g, dtype=dtype),
           torch.randn(batch, n, heads, dim, generator=g, dtype=dtype)) for n in keys]
    return q, kv


def test_update_out_and_lse_over_key_blocks_equals_attention_over_all_keys():
    q, kv = _blocks(1)
    out = lse = None
    for k, v in kv:
        block_out, block_lse = REFERENCE.forward(q, k, v, scale=0.3)
        out, lse = update_out_and_lse(out, lse, block_out, block_lse)
    want_out, want_lse = REFERENCE.forward(q, torch.cat([k for k, _ in kv], 1), torch.cat([v for _, v in kv], 1),
                                           scale=0.3)
    assert out.dtype == torch.float64 and lse.shape == (2, 6, 2, 1)  # the running LSE is [batch, seqlen, heads, 1]
    assert rel_err(out, want_out) <= TOL
    assert rel_err(lse.squeeze(-1).transpose(1, 2), want_lse) <= TOL


def test_update_out_and_lse_varlen_layout_and_float32_accumulators():
    q, kv = _blocks(2, batch=1, dtype=torch.float32)
    out = lse = None
    for k, v in kv:  # varlen: [tokens, heads, dim] and LSE [heads, tokens]
        block_out, block_lse = REFERENCE.forward(q, k, v, scale=0.3)
        out, lse = update_out_and_lse(out, lse, block_out[0], block_lse[0])
    want_out, want_lse = REFERENCE.forward(q.double(), torch.cat([k for k, _ in kv], 1).double(),
                                           torch.cat([v for _, v in kv], 1).double(), scale=0.3)
    assert out.dtype == torch.float32 and lse.shape == (6, 2, 1)
    assert rel_err(out, want_out[0]) <= FORWARD[torch.float32]
    assert rel_err(lse.squeeze(-1).transpose(0, 1), want_lse[0]) <= FORWARD[torch.float32]


def test_update_out_and_lse_slice_folds_a_block_into_some_rows_only():
    """zigzag's use: the second half of the queries sees a block the first half does not."""
    q, ((k0, v0), (k1, v1), _) = _blocks(3)
    out, lse = update_out_and_lse(None, None, *REFERENCE.forward(q, k0, v0, scale=0.3))
    half = q.shape[1] // 2
    block = REFERENCE.forward(q[:, half:], k1, v1, scale=0.3)
    out, lse = update_out_and_lse(out, lse, *block, slice_=(slice(None), slice(half, None)))
    first, _ = REFERENCE.forward(q[:, :half], k0, v0, scale=0.3)
    second, _ = REFERENCE.forward(q[:, half:], torch.cat([k0, k1], 1), torch.cat([v0, v1], 1), scale=0.3)
    assert rel_err(out, torch.cat([first, second], dim=1)) <= TOL


def test_update_out_and_lse_rows_without_keys_stay_zero_and_minus_inf():
    q, ((k, v), _, _) = _blocks(4)
    masked = REFERENCE.forward(q, k, v, scale=0.3, causal=True, q_offset=0, k_offset=q.shape[1])  # sees nothing
    out, lse = update_out_and_lse(None, None, *masked)
    out, lse = update_out_and_lse(out, lse, *masked)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())


def test_update_out_and_lse_refuses_what_it_cannot_fold():
    q, ((k, v), _, _) = _blocks(5)
    block = REFERENCE.forward(q, k, v, scale=0.3)
    with pytest.raises(RuntimeError, match="slice_: the first update_out_and_lse call"):
        update_out_and_lse(None, None, *block, slice_=(slice(None), slice(1, None)))
    out, lse = update_out_and_lse(None, None, *block)
    with pytest.raises(ValueError, match=r"block_out/block_lse: expected .* got \(2, 3, 2, 8\)"):
        update_out_and_lse(out, lse, block[0][:, :3], block[1][..., :3])


def test_flatten_and_unflatten_varlen_lse_between_padded_and_packed_layouts():
    cu_seqlens = torch.tensor([0, 3, 8, 8, 10], dtype=torch.int32)  # an empty sequence too
    g = torch.Generator().manual_seed(6)
    padded = torch.randn(4, 2, 6, generator=g, dtype=torch.float64)
    packed = flatten_varlen_lse(padded, cu_seqlens)
    want = torch.cat([padded[i, :, :int(cu_seqlens[i + 1] - cu_seqlens[i])] for i in range(4)], dim=1)
    assert torch.equal(packed, want) and flatten_at_triton_utils is flatten_varlen_lse
    back = unflatten_varlen_lse(packed.t().unsqueeze(-1), cu_seqlens, 6)  # the running LSE's [tokens, heads, 1]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    for i, n in enumerate(lengths):
        assert torch.equal(back[i, :, :n], padded[i, :, :n])
        assert bool(torch.isneginf(back[i, :, n:]).all())
    with pytest.raises(ValueError, match="max_seqlen: expected at least the longest sequence's 5 tokens, got 4"):
        unflatten_varlen_lse(packed.t(), cu_seqlens, 4)
    with pytest.raises(ValueError, match=r"lse: expected \[batch=4, heads, max_seqlen >= 5\]"):
        flatten_varlen_lse(padded[:3], cu_seqlens)


def test_get_default_args_of_flash_attn_style_functions():
    def forward(q, k, v, dropout_p, softmax_scale, causal=False, window_size=(-1, -1), softcap=0.5, *rest,
                return_softmax=False):
        pass

    args = get_default_args(forward)
    assert args == {"q": None, "k": None, "v": None, "dropout_p": None, "softmax_scale": None, "causal": False,
                    "window_size": (-1, -1), "softcap": 0.0}
    assert get_default_args(forward) is args  # cached, as there: callers copy before updating

    @torch.library.custom_op("ring_flash_attn_test::scaled", mutates_args=())
    def scaled(x: torch.Tensor, factor: float = 2.0, softcap: float = 1.0) -> torch.Tensor:
        return x * factor

    assert get_default_args(scaled) == {"x": None, "factor": 2.0, "softcap": 0.0}
