"""All-gather ("llama3") context parallelism against the packed float64 oracle on 1-4 CPU ranks."""

import os

import pytest
import torch

from tests.distributed.harness import run_world
from tests.distributed.workers import DTYPES, llama3_errors
from tests.tolerances import FORWARD, GRADIENT

SEED = int.from_bytes(os.urandom(4), "little")
BASE = dict(batch=1, heads=4, head_dim=16, backend="sdpa")
# Totals are multiples of 24 so every world size 1-4 splits them (zigzag: 2P chunks of each sequence).
CASES = [
    # contiguous llama3 layout: sequences of very different lengths, some shorter than the rank count, crossing ranks
    dict(layout="llama3", causal=True, seqlens=(2, 3, 40, 1, 26), heads_k=2, heads_k_stride=1, dtype="float64"),
    dict(layout="llama3", causal=False, seqlens=(30, 3, 39), heads_k=2, heads_k_stride=2, dtype="float64"),
    dict(layout="llama3", causal=True, seqlens=(50, 1, 21), heads_k=4, heads_k_stride=2, dtype="float64",
         window=(5, -1)),
    dict(layout="llama3", causal=False, seqlens=(47, 1), heads_k=1, heads_k_stride=1, dtype="float64",
         window=(4, 6)),
    dict(layout="llama3", causal=True, seqlens=(20, 3, 49), heads_k=2, heads_k_stride=1, dtype="bfloat16"),
    dict(layout="llama3", causal=False, seqlens=(40, 2, 30), heads_k=2, heads_k_stride=1, dtype="float64",
         alibi=True, backend=None),
    # zero-length sequences (repeated offsets: inside a rank's piece, on a piece's edge, at both ends) and int64
    dict(layout="llama3", causal=True, seqlens=(0, 5, 0, 7, 0, 12, 0, 24, 0, 6, 0, 18, 0), heads_k=2, heads_k_stride=1,
         dtype="float64", cu_dtype="int64", window=(6, -1)),
    dict(layout="llama3", causal=False, seqlens=(12, 0, 12, 0, 24, 24, 0), heads_k=2, heads_k_stride=2,
         dtype="float64"),
    # load-balanced (zigzag) layout over the same all-gather exchange
    dict(layout="zigzag", causal=True, seqlens=(48, 24), heads_k=2, heads_k_stride=1, dtype="float64"),
    dict(layout="zigzag", causal=True, seqlens=(24, 72), heads_k=4, heads_k_stride=4, dtype="float64",
         window=(9, -1)),
    dict(layout="zigzag", causal=True, seqlens=(48, 48), heads_k=2, heads_k_stride=2, dtype="bfloat16"),
    dict(layout="zigzag", causal=True, seqlens=(24, 48), heads_k=2, heads_k_stride=1, dtype="float64", alibi=True,
         backend=None),
    dict(layout="zigzag", causal=True, seqlens=(0, 24, 0, 48, 0), heads_k=2, heads_k_stride=1, dtype="float64",
         cu_dtype="int64"),
    # many short sequences of one length: their calls are batched (ring/batching.py), in both layouts
    dict(layout="llama3", causal=True, seqlens=(3,) * 16, heads_k=2, heads_k_stride=1, dtype="float64"),
    dict(layout="zigzag", causal=True, seqlens=(24,) * 6, heads_k=2, heads_k_stride=2, dtype="float64",
         alibi=True, backend=None),
]
CASES = [dict(dict(BASE, seed=SEED + n), **c) for n, c in enumerate(CASES)]
WORLD_SIZES = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def errors_by_world():
    return {p: run_world(p, llama3_errors, CASES) for p in WORLD_SIZES}


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("index", range(len(CASES)),
                         ids=[f"{c['layout']}-{'causal' if c['causal'] else 'full'}-{c['dtype']}-{n}"
                              for n, c in enumerate(CASES)])
def test_llama3_matches_oracle(errors_by_world, world_size, index):
    dtype = DTYPES[CASES[index]["dtype"]]
    for rank, errs in enumerate(errors_by_world[world_size]):
        e = errs[index]
        assert e["out"] <= FORWARD[dtype] and e["lse"] <= FORWARD[dtype], (rank, e)
        assert max(e["dq"], e["dk"], e["dv"]) <= GRADIENT[dtype], (rank, e)


def test_prepare_cu_seqlens_splits_crossing_sequences():
    from ring_flash_attn import llama3_flash_attn_prepare_cu_seqlens as prepare

    cu = torch.tensor([0, 3, 10, 12], dtype=torch.int32)  # lengths 3, 7, 2 over 2 ranks of 6 tokens
    cu_q, cu_k, max_q, max_k, k_slice = prepare(cu, True, 1, 2)
    assert cu_q.tolist() == [0, 4, 6] and cu_k.tolist() == [0, 7, 9] and k_slice == slice(3, 12)
    assert (max_q, max_k) == (4, 7)
    cu_q, cu_k, _, _, k_slice = prepare(cu, False, 0, 2)
    assert cu_q.tolist() == [0, 3, 6] and cu_k.tolist() == [0, 3, 10] and k_slice == slice(0, 10)
    with pytest.raises(ValueError, match="split evenly over 5 ranks"):
        prepare(cu, True, 0, 5)


def test_prepare_cu_seqlens_takes_zero_length_sequences_and_int64():
    from ring_flash_attn import llama3_flash_attn_prepare_cu_seqlens as prepare

    # lengths 0, 3, 0, 3, 0, 6 over 2 ranks of 6 tokens: the empty sequence at 3 sits inside rank 0's piece,
    # the one at 6 on the edge between the pieces
    cu = torch.tensor([0, 0, 3, 3, 6, 6, 12], dtype=torch.int64)
    cu_q, cu_k, max_q, max_k, k_slice = prepare(cu, True, 0, 2)
    assert cu_q.dtype == torch.int32 and cu_q.tolist() == [0, 3, 3, 6] and cu_k.tolist() == [0, 3, 3, 6]
    assert (max_q, max_k, k_slice) == (3, 3, slice(0, 6))
    cu_q, cu_k, _, _, k_slice = prepare(cu, True, 1, 2)
    assert cu_q.tolist() == [0, 6] and cu_k.tolist() == [0, 6] and k_slice == slice(6, 12)
