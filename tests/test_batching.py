"""Equal-shape kernel calls of a ring step batched into one call (ring/batching.py).

The grouping: every planned call is made exactly once, a batch holds calls of one shape on disjoint query
rows. The numbers: one rank's schedule through the loopback communicator (no ranks needed) on packed batches
of many short sequences, against the float64 oracle (out, LSE and dQ are exact through the loopback; dK/dV
of batched calls are checked on real ranks in tests/distributed/test_ring_correctness.py), and against the
same schedule with batching off.
"""

import os
import random

import pytest
import torch

from ring_flash_attn import ring_attention
from ring_flash_attn.comm.loopback import LoopbackComm
from ring_flash_attn.kernels.mask import Band
from ring_flash_attn.ring import batching
from ring_flash_attn.ring.batching import TaskBatch, add_rows, batch_calls, gather_rows, put_rows, step_calls
from ring_flash_attn.ring.layouts import PackedLayout, get_layout
from ring_flash_attn.ring.planner import clear_plan_caches, plan_step
from tests.distributed.workers import packed_oracle
from tests.tolerances import rel_err

SEED = int.from_bytes(os.urandom(4), "little")


def _random_packed(variant, world_size, rng):
    unit = get_layout(variant).chunks_per_rank
    lengths = [unit * rng.choice((1, 1, 2, 3)) for _ in range(rng.randint(2, 40))]
    return PackedLayout(get_layout(variant), tuple(lengths))


@pytest.mark.parametrize("variant", ["ring", "zigzag", "stripe"])
def test_batches_hold_every_call_once_on_disjoint_rows(variant):
    rng = random.Random(SEED)
    for _ in range(30):
        world_size = rng.randint(1, 8)
        layout = _random_packed(variant, world_size, rng)
        band = rng.choice((Band.from_kernel_args(True, (-1, -1)), Band.from_kernel_args(False, (-1, -1)),
                           Band.from_kernel_args(True, (rng.randint(0, 9), -1))))
        rank = rng.randrange(world_size)
        for src in range(world_size):
            tasks = plan_step(layout, rank, src, world_size, sum(layout.seqlens_local), band)
            # the packed path (batched as planned) and the general one (batching planned blocks)
            for calls in (step_calls(layout, rank, src, world_size, sum(layout.seqlens_local), band),
                          batch_calls(tasks)):
                _check_batches(calls, tasks)
        # many sequences of one length: a step's calls collapse to a few batches
        many = PackedLayout(get_layout(variant), (get_layout(variant).chunks_per_rank,) * 64)
        for calls in (batch_calls(plan_step(many, rank, 0, world_size, sum(many.seqlens_local), band)),
                      step_calls(many, rank, 0, world_size, sum(many.seqlens_local), band)):
            assert len(calls) <= 4, calls


def _check_batches(calls, tasks):
    """Every planned block made exactly once; a batch: at least MIN_BATCHED_CALLS blocks of one shape, on
    disjoint query rows and disjoint key rows."""
    flat = [t for c in calls for t in (c.tasks if isinstance(c, TaskBatch) else (c,))]
    assert sorted(flat) == sorted(tasks), SEED
    for call in calls:
        if not isinstance(call, TaskBatch):
            continue
        assert len(call) >= batching.MIN_BATCHED_CALLS
        assert len({(t.q_stop - t.q_start, t.k_stop - t.k_start, t.band, t.positions) for t in call.tasks}) == 1
        for start, stop in ((0, 1), (2, 3)):  # query rows, key rows: each row in at most one call of a batch
            rows = sorted(t[start:stop + 1] for t in call.tasks)
            assert all(a[1] <= b[0] for a, b in zip(rows, rows[1:])), (SEED, rows)
        # its row indices (made with those of the step's other batches): its blocks' rows, block after block
        q_rows, k_rows = call.indices(torch.device("cpu"))
        assert q_rows.tolist() == [r for t in call.tasks for r in range(t.q_start, t.q_stop)], SEED
        assert k_rows.tolist() == [r for t in call.tasks for r in range(t.k_start, t.k_stop)], SEED


def test_long_blocks_are_not_batched():
    long = batching.MAX_BATCHED_ROWS + 1
    layout = PackedLayout(get_layout("ring"), (long, long, long))
    tasks = plan_step(layout, 0, 0, 1, 3 * long, Band.from_kernel_args(True, (-1, -1)))
    assert batch_calls(tasks) == tasks
    assert sorted(step_calls(layout, 0, 0, 1, 3 * long, Band.from_kernel_args(True, (-1, -1)))) == sorted(tasks)


def test_gathered_rows_go_back_where_they_came_from():
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(2, 40, 3, 4, generator=g, dtype=torch.float64)
    lse = torch.randn(2, 3, 40, generator=g, dtype=torch.float64)
    index = torch.tensor([4, 5, 6, 20, 21, 22, 30, 31, 32])
    part, lse_part = gather_rows(x, index, 3), gather_rows(lse, index, 3, dim=2)
    assert part.shape == (6, 3, 3, 4) and lse_part.shape == (6, 3, 3)
    assert torch.equal(part[1], x[0, 20:23]) and torch.equal(part[3 + 2], x[1, 30:33])
    assert torch.equal(lse_part[4], lse[1, :, 20:23])
    y, lse_y = torch.zeros_like(x), torch.zeros_like(lse)
    put_rows(y, index, part)
    put_rows(lse_y, index, lse_part, dim=2)
    assert torch.equal(y[:, index], x[:, index]) and torch.equal(lse_y[:, :, index], lse[:, :, index])
    add_rows(y, index, part)
    assert torch.equal(y[:, index], 2 * x[:, index])


def test_unpacked_layouts_are_not_batched():
    """An unpacked layout's few long calls are cheaper as they are than gathered."""
    for variant in ("ring", "zigzag", "stripe"):
        for src in range(4):
            tasks = plan_step(get_layout(variant), 1, src, 4, 64, Band.from_kernel_args(True, (-1, -1)))
            assert batch_calls(tasks) == tasks


def test_per_sequence_alibi_slopes_follow_the_batch_order():
    """``[B, H]`` slopes for a batch of n calls on B sequences: row b * n + i is sequence b's."""
    from ring_flash_attn.ring.engine import kernel_kwargs

    tasks = tuple(plan_step(PackedLayout(get_layout("ring"), (2,) * 4), 0, 0, 1, 8, Band.from_kernel_args(True, (-1, -1))))
    (call,) = batch_calls(tasks)
    slopes = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    got = kernel_kwargs(call, 1.0, 0.0, slopes)["alibi_slopes"]
    assert torch.equal(got, torch.tensor([[1.0, 2.0]] * 4 + [[3.0, 4.0]] * 4))


def _loopback_rank(layout, rank, world_size, inputs, causal, window, alibi):
    q, k, v, dout = (layout.shard(t, rank, world_size) for t in inputs)
    kv_by_rank = [torch.stack((layout.shard(inputs[1], r, world_size), layout.shard(inputs[2], r, world_size)))
                  for r in range(world_size)]
    q.requires_grad_()
    out, lse = ring_attention(q, k, v, variant=layout, causal=causal, window_size=window, backend="reference",
                              alibi_slopes=alibi, comm=LoopbackComm(rank, kv_by_rank))
    out.backward(dout)
    return out.detach(), lse, q.grad


@pytest.mark.parametrize("variant,causal,window,alibi", [
    ("zigzag", True, (-1, -1), False), ("ring", False, (3, 2), False), ("stripe", True, (-1, -1), True),
    ("ring", True, (5, -1), True),
])
def test_batched_schedule_matches_the_oracle_and_the_unbatched_one(variant, causal, window, alibi, monkeypatch):
    world_size = 4
    unit = get_layout(variant).chunks_per_rank * world_size
    seqlens = (unit,) * 9 + (2 * unit,) * 3 + (0, unit)  # global lengths; zero-length ones as padding makes
    layout = PackedLayout(get_layout(variant), tuple(n // world_size for n in seqlens))
    g = torch.Generator().manual_seed(SEED)
    total, heads, heads_k, dim = sum(seqlens), 4, 2, 8
    inputs = [torch.randn(1, total, h, dim, generator=g, dtype=torch.float64) for h in (heads, heads_k, heads_k, heads)]
    slopes = torch.rand(heads, generator=g) * 0.5 + 0.05 if alibi else None  # float32, as the kernels take them
    ref = packed_oracle(*inputs, seqlens, causal=causal, window=window, scale=dim ** -0.5, alibi_slopes=slopes)
    for rank in range(world_size):
        clear_plan_caches()
        batched = _loopback_rank(layout, rank, world_size, inputs, causal, window, slopes)
        assert any(isinstance(c, TaskBatch) for src in range(world_size) for c in batching.step_calls(
            layout, rank, src, world_size, sum(layout.seqlens_local), Band.from_kernel_args(causal, window),
            keep_positions=alibi)), "nothing was batched: the test would not test batching"
        want = (layout.shard(ref[0], rank, world_size), layout.shard(ref[1], rank, world_size, 2),
                layout.shard(ref[2], rank, world_size))
        for name, got, expected in zip(("out", "lse", "dq"), batched, want):
            assert rel_err(got, expected) < 1e-12, (SEED, rank, name, rel_err(got, expected))
        with monkeypatch.context() as patch:
            patch.setattr(batching, "MAX_BATCHED_ROWS", 0)
            clear_plan_caches()
            unbatched = _loopback_rank(layout, rank, world_size, inputs, causal, window, slopes)
        for name, got, expected in zip(("out", "lse", "dq"), batched, unbatched):
            assert rel_err(got, expected) < 1e-12, (SEED, rank, name)
    clear_plan_caches()


def test_batches_hold_at_most_max_calls_per_batch(monkeypatch):
    """A batch is split at MAX_CALLS_PER_BATCH calls (the kernels' batch grid axis is limited): lowered here,
    64 equal sequences make batches of at most 5 calls that still hold every planned block once."""
    monkeypatch.setattr(batching, "MAX_CALLS_PER_BATCH", 5)
    band = Band.from_kernel_args(True, (-1, -1))
    for variant in ("ring", "zigzag", "stripe"):
        many = PackedLayout(get_layout(variant), (get_layout(variant).chunks_per_rank,) * 64)
        for world_size, rank, src in ((1, 0, 0), (4, 3, 3), (4, 3, 1)):
            clear_plan_caches()
            tasks = plan_step(many, rank, src, world_size, sum(many.seqlens_local), band)
            for calls in (step_calls(many, rank, src, world_size, sum(many.seqlens_local), band),
                          batch_calls(tasks)):
                _check_batches(calls, tasks)
                assert max(len(c) for c in calls if isinstance(c, TaskBatch)) == 5, (variant, world_size, src)
    clear_plan_caches()


@pytest.mark.parametrize("variant,causal,window", [("zigzag", True, (-1, -1)), ("ring", False, (-1, -1)),
                                                   ("stripe", True, (-1, -1)), ("ring", True, (5, -1))])
def test_variable_length_calls_match_the_oracle(variant, causal, window, monkeypatch):
    """A packed batch's small unmasked blocks and causal squares as VarlenBatches (one call of a backend's
    variable-length kernel each; here the reference backend's per-block default, as a CPU stand-in for
    FlashAttention-2's): every planned block once, on disjoint query and key rows; over the loopback at P = 4 out,
    LSE and dQ, and at P = 1 (no exchange) dK and dV too, against the float64 oracle."""
    from ring_flash_attn.kernels.reference import ReferenceBackend
    from ring_flash_attn.ring.batching import VarlenBatch

    monkeypatch.setattr(ReferenceBackend, "serves_varlen", lambda self, features: True)
    varlen_calls = []  # (forward or backward) the engine made
    for method in ("forward_varlen", "backward_varlen"):
        made_by_default = getattr(ReferenceBackend, method)
        monkeypatch.setattr(ReferenceBackend, method, lambda self, *a, _f=made_by_default, _m=method, **kw: (
            varlen_calls.append(_m), _f(self, *a, **kw))[1])
    g = torch.Generator().manual_seed(SEED)
    rng = random.Random(SEED)
    heads, heads_k, dim = 4, 2, 8
    for world_size in (4, 1):
        unit = get_layout(variant).chunks_per_rank * world_size
        seqlens = tuple(unit * rng.choice((1, 2, 3, 5)) for _ in range(14)) + (0, unit)
        layout = PackedLayout(get_layout(variant), tuple(n // world_size for n in seqlens))
        band = Band.from_kernel_args(causal, window)
        total = sum(seqlens)
        inputs = [torch.randn(1, total, h, dim, generator=g, dtype=torch.float64) for h in (heads, heads_k, heads_k, heads)]
        ref = packed_oracle(*inputs, seqlens, causal=causal, window=window, scale=dim ** -0.5)
        made = 0
        varlen_calls.clear()
        for rank in range(world_size):
            clear_plan_caches()
            for src in range(world_size):
                calls = step_calls(layout, rank, src, world_size, sum(layout.seqlens_local), band, varlen=True)
                tasks = plan_step(layout, rank, src, world_size, sum(layout.seqlens_local), band)
                flat = [t for c in calls for t in (c.tasks if isinstance(c, (TaskBatch, VarlenBatch)) else (c,))]
                assert sorted(flat) == sorted(tasks), (SEED, rank, src)
                for call in calls:
                    if isinstance(call, VarlenBatch):
                        made += 1
                        for side in (0, 2):  # disjoint query rows, disjoint key rows
                            rows = sorted(t[side:side + 2] for t in call.tasks)
                            assert all(a[1] <= b[0] for a, b in zip(rows, rows[1:])), SEED
                        assert all(t.band is None for t in call.tasks) if not call.causal else all(
                            t.band.is_top_left_causal(t.q_stop - t.q_start, t.k_stop - t.k_start) for t in call.tasks)
                        q_rows, k_rows = call.indices(torch.device("cpu"))
                        assert q_rows.tolist() == [r for t in call.tasks for r in range(t.q_start, t.q_stop)]
                        assert k_rows.tolist() == [r for t in call.tasks for r in range(t.k_start, t.k_stop)]
            q, k, v, dout = (layout.shard(t, rank, world_size) for t in inputs)
            kv_by_rank = [torch.stack((layout.shard(inputs[1], r, world_size), layout.shard(inputs[2], r, world_size)))
                          for r in range(world_size)]
            q.requires_grad_()
            k.requires_grad_()
            v.requires_grad_()
            comm = LoopbackComm(rank, kv_by_rank)  # at P = 1 no exchange: dK/dV are exact
            out, lse = ring_attention(q, k, v, variant=layout, causal=causal, window_size=window, backend="reference",
                                      comm=comm)
            out.backward(dout)
            got = [out, lse, q.grad] + ([k.grad, v.grad] if world_size == 1 else [])
            for name, value, want, dim_ in zip(("out", "lse", "dq", "dk", "dv"), got, ref, (1, 2, 1, 1, 1)):
                expected = layout.shard(want, rank, world_size, dim_)
                assert rel_err(value, expected) < 1e-12, (SEED, world_size, rank, name, rel_err(value, expected))
        # the engine made variable-length calls, forward and backward (the test would not test them otherwise);
        # at P = 1 a window can leave no unmasked block and no causal square
        if world_size > 1 or window == (-1, -1):
            assert made and {"forward_varlen", "backward_varlen"} <= set(varlen_calls), (SEED, world_size)
    clear_plan_caches()
