"""The llama3 exchange's plan (the trainer's document masking): a causal piece of a document is the unmasked
block of its document's earlier keys and the causal square of its own, never a band-masked block; with a
variable-length kernel, all unmasked blocks are one call and all causal squares another. Checked pair by pair
against the causal document mask on random packed batches, and on gloo ranks against the float64 oracle (with
the load-balanced all-gather exchange too, whose calls are the ring's step calls)."""

import os
import random
from itertools import accumulate

import pytest
import torch

import ring_flash_attn as rfa
from ring_flash_attn.kernels.mask import Band
from ring_flash_attn.llama3 import _llama3_calls, _llama3_tasks
from ring_flash_attn.ring.batching import MIN_BATCHED_CALLS, TaskBatch, VarlenBatch
from ring_flash_attn.ring.planner import clear_plan_caches
from tests.distributed.harness import run_world
from tests.distributed.workers import DTYPES, llama3_varlen_errors
from tests.tolerances import GRADIENT

SEED = int.from_bytes(os.urandom(4), "little")


def _pieces(seqlens, rank, world_size, causal):
    cu = torch.tensor([0, *accumulate(seqlens)], dtype=torch.int32)
    cu_q, cu_k, _, _, local_k_slice = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, causal, rank, world_size)
    piece = sum(seqlens) // world_size
    return (tuple(cu_q.tolist()), tuple(cu_k.tolist()), local_k_slice.start, rank * piece,
            Band.from_kernel_args(causal, (-1, -1)), False), piece


def _visible(tasks, piece, total):
    """[piece, total] bool: the (query, gathered key) pairs the blocks compute, each at most once."""
    seen = torch.zeros(piece, total, dtype=torch.int64)
    for t in tasks:
        q_len, k_len = t.q_stop - t.q_start, t.k_stop - t.k_start
        block = torch.ones(q_len, k_len, dtype=torch.bool) if t.band is None else t.band.dense(q_len, k_len)
        seen[t.q_start:t.q_stop, t.k_start:t.k_stop] += block.long()
    assert seen.max() <= 1, "a pair computed twice"
    return seen.bool()


def _want(seqlens, rank, piece, causal):
    doc = torch.repeat_interleave(torch.arange(len(seqlens)), torch.tensor(seqlens))
    pos = torch.arange(sum(seqlens))
    q_pos = pos[rank * piece:(rank + 1) * piece]
    same = doc[q_pos][:, None] == doc[None, :]
    return same & (q_pos[:, None] >= pos[None, :]) if causal else same


@pytest.mark.parametrize("world_size", [2, 4, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_blocks_cover_the_document_mask_with_plain_calls(world_size, causal):
    rng = random.Random(SEED + world_size)
    for trial in range(5):
        seqlens = [rng.randint(1, 40) for _ in range(rng.randint(1, 24))]
        seqlens[-1] += -sum(seqlens) % world_size
        total = sum(seqlens)
        for rank in range(world_size):
            clear_plan_caches()
            pieces, piece = _pieces(seqlens, rank, world_size, causal)
            tasks, banded = _llama3_tasks(*pieces)
            assert not banded, (SEED, seqlens, rank)
            assert all(t.band is None or t.band.is_top_left_causal(t.q_stop - t.q_start, t.k_stop - t.k_start)
                       for t in tasks), (SEED, seqlens, rank)
            assert torch.equal(_visible(tasks, piece, total), _want(seqlens, rank, piece, causal)), (SEED, seqlens)
            for varlen in (False, True):
                calls = _llama3_calls(*pieces, varlen)
                flat = [t for c in calls for t in (c.tasks if isinstance(c, (TaskBatch, VarlenBatch)) else (c,))]
                assert sorted(flat) == sorted(tasks), (SEED, seqlens, rank, varlen)
                for call in calls:
                    if isinstance(call, VarlenBatch):
                        assert varlen and len(call) >= MIN_BATCHED_CALLS
                        assert all((t.band is None) != call.causal for t in call.tasks)
                        for side in (0, 2):  # disjoint query rows, disjoint key rows
                            rows = sorted(t[side:side + 2] for t in call.tasks)
                            assert all(a[1] <= b[0] for a, b in zip(rows, rows[1:])), (SEED, seqlens)
    clear_plan_caches()


def test_many_documents_make_two_variable_length_calls():
    """1024 documents of 16-400 tokens over 8 ranks: at most one unmasked and one causal call per rank."""
    rng = random.Random(SEED)
    seqlens = [rng.randint(16, 400) for _ in range(1024)]
    seqlens[-1] += -sum(seqlens) % 8
    for rank in range(8):
        clear_plan_caches()
        pieces, _ = _pieces(seqlens, rank, 8, True)
        kinds = sorted(c.causal for c in _llama3_calls(*pieces, True) if isinstance(c, VarlenBatch))
        assert kinds in ([True], [False, True]), (SEED, rank, kinds)
    clear_plan_caches()


# Documents crossing the ranks' pieces; enough of them per rank that the variable-length calls form.
CASES = [dict(layout="llama3", causal=True, seqlens=(5, 7, 12, 2, 24, 6, 18, 3, 9, 11, 4, 19), heads=4, heads_k=2,
              heads_k_stride=1, head_dim=8, batch=1, dtype="float64", backend="reference", seed=SEED),
         dict(layout="llama3", causal=True, seqlens=(9, 3, 14, 6, 1, 22, 7, 10, 2, 16, 5, 25), heads=4, heads_k=2,
              heads_k_stride=2, head_dim=8, batch=1, dtype="float64", backend="reference", seed=SEED + 1,
              window=(6, -1)),  # a band: no variable-length calls
         dict(layout="llama3", causal=False, seqlens=(8, 8, 12, 4, 20, 4, 16, 12, 8, 14, 6, 8), heads=4, heads_k=4,
              heads_k_stride=2, head_dim=8, batch=1, dtype="float64", backend="reference", seed=SEED + 2),
         # the load-balanced all-gather exchange (zigzag_llama3_flash_attn_varlen_func): the ring's step calls
         dict(layout="zigzag", causal=True, seqlens=(8, 16, 8, 24, 8, 8, 16, 8, 24, 8, 8, 16), heads=4, heads_k=2,
              heads_k_stride=1, head_dim=8, batch=1, dtype="float64", backend="reference", seed=SEED + 3)]


def test_variable_length_calls_over_gloo_ranks_match_the_float64_oracle():
    for rank, (errors, made) in enumerate(run_world(4, llama3_varlen_errors, CASES, timeout_s=120)):
        for case, error in zip(CASES, errors):
            assert all(e <= GRADIENT[DTYPES[case["dtype"]]] for e in error.values()), (SEED, rank, case, error)
        assert {"forward", "backward"} <= set(made), (SEED, rank, made)  # the stand-in served calls


def test_pieces_through_the_engine_steps_match_the_float64_oracle(monkeypatch):
    """The check tests/gpu runs through FlashAttention-2 on CUDA, here with the reference backend's per-block
    default standing in for the variable-length kernel (float64): the variable-length calls are made."""
    from ring_flash_attn.kernels.reference import ReferenceBackend
    from tests.distributed.workers import packed_oracle
    from tests.gpu.packed import check_llama3_pieces

    monkeypatch.setattr(ReferenceBackend, "serves_varlen", lambda self, features: True)
    rng = random.Random(SEED)
    seqlens = [rng.randint(1, 30) for _ in range(40)]
    seqlens[-1] += -sum(seqlens) % 4
    g = torch.Generator().manual_seed(SEED)
    inputs = [torch.randn(1, sum(seqlens), h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4)]
    ref = packed_oracle(*inputs, seqlens, causal=True, window=(-1, -1), scale=8 ** -0.5)
    clear_plan_caches()
    assert check_llama3_pieces(seqlens, 4, inputs, ref, torch.float64, "reference", ("cpu",)) >= 4
    clear_plan_caches()


def test_allgather_ranks_through_the_engine_steps_match_the_float64_oracle(monkeypatch):
    """The same check for the load-balanced all-gather exchange (zigzag, packed), as tests/gpu runs it."""
    from ring_flash_attn.kernels.reference import ReferenceBackend
    from ring_flash_attn.ring.layouts import PackedLayout, get_layout
    from tests.distributed.workers import packed_oracle
    from tests.gpu.packed import check_allgather_ranks

    monkeypatch.setattr(ReferenceBackend, "serves_varlen", lambda self, features: True)
    rng = random.Random(SEED)
    world_size = 4
    seqlens = [2 * world_size * rng.randint(1, 4) for _ in range(24)]
    layout = PackedLayout(get_layout("zigzag"), tuple(n // world_size for n in seqlens))
    g = torch.Generator().manual_seed(SEED)
    inputs = [torch.randn(1, sum(seqlens), h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4)]
    ref = packed_oracle(*inputs, seqlens, causal=True, window=(-1, -1), scale=8 ** -0.5)
    clear_plan_caches()
    assert check_allgather_ranks(layout, world_size, inputs, ref, torch.float64, "reference", ("cpu",)) >= world_size
    clear_plan_caches()
