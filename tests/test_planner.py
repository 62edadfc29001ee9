"""The ring planner against its previous (quadratic) implementation, kept here as the oracle.

The old planner paired every query run with every key run and merged fully visible blocks one pair at a time;
the new one pairs runs by segment, merges in sorted passes, plans a packed batch per distinct sequence length
and answers "does any rank need a band mask" from the run geometries. Its calls must be the old ones, or
provably equivalent merged calls (see :func:`assert_equivalent`). Pure Python, no ranks.
"""

import random
import time
from itertools import accumulate

import pytest
import torch

from ring_flash_attn.kernels.mask import Band, strided_band
from ring_flash_attn.ring.allgather import allgather_calls
from ring_flash_attn.ring.layouts import LAYOUTS, PackedLayout, get_layout
from ring_flash_attn.ring.planner import BlockTask, layout_needs_band_mask, needs_band_mask, plan_step


# -- the previous implementation (ring/planner.py before issue 19), verbatim in behaviour ---------------------
def _old_joined_positions(a, b, k_side):
    if a.positions is None or b.positions is None or a.positions[1] != b.positions[1]:
        return None
    (delta_a, stride), (delta_b, _) = a.positions, b.positions
    step = stride * ((a.k_stop - a.k_start) if k_side else -(a.q_stop - a.q_start))
    return a.positions if delta_b == delta_a - step else None


def _old_merge_full(a, b, keep_positions):
    if a.band is not None or b.band is not None:
        return None
    for k_side in (True, False):
        adjacent = ((a.q_start, a.q_stop) == (b.q_start, b.q_stop) and a.k_stop == b.k_start) if k_side else \
            ((a.k_start, a.k_stop) == (b.k_start, b.k_stop) and a.q_stop == b.q_start)
        if not adjacent:
            continue
        positions = _old_joined_positions(a, b, k_side)
        if keep_positions and positions is None:
            return None
        if k_side:
            return BlockTask(a.q_start, a.q_stop, a.k_start, b.k_stop, None, positions)
        return BlockTask(a.q_start, b.q_stop, a.k_start, a.k_stop, None, positions)
    return None


def _old_coalesce(tasks, keep_positions):
    merged = True
    while merged:
        merged = False
        tasks.sort(key=lambda t: (t.q_start, t.k_start))
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                if i != j and (joined := _old_merge_full(tasks[i], tasks[j], keep_positions)) is not None:
                    tasks = [t for n, t in enumerate(tasks) if n not in (i, j)] + [joined]
                    merged = True
                    break
            if merged:
                break
    return tasks


def old_plan_step(layout, rank, src, world_size, seqlen_local, band, keep_positions=False):
    tasks = []
    for q_run in layout.runs(rank, world_size, seqlen_local):
        for k_run in layout.runs(src, world_size, seqlen_local):
            if q_run.segment != k_run.segment:
                continue
            if q_run.stride != k_run.stride:
                raise ValueError("layouts with different strides on different ranks are not supported")
            index_band = strided_band(band, q_run.global_start, k_run.global_start, q_run.stride)
            if index_band.is_empty(q_run.length, k_run.length):
                continue
            full = index_band.is_full(q_run.length, k_run.length)
            tasks.append(BlockTask(q_run.local_start, q_run.local_start + q_run.length,
                                   k_run.local_start, k_run.local_start + k_run.length,
                                   None if full else index_band,
                                   (q_run.global_start - k_run.global_start, q_run.stride)))
    return tuple(_old_coalesce(tasks, keep_positions))


def old_layout_needs_band_mask(layout, world_size, seqlen_local, band):
    return any(needs_band_mask(old_plan_step(layout, rank, src, world_size, seqlen_local, band))
               for rank in range(world_size) for src in range(world_size))


# -- equivalence -------------------------------------------------------------------------------------------
def _order(task):
    return task.q_start, task.k_start


def coverage(tasks, q_rows, k_rows):
    """How many calls see each (query row, key row) pair (a pair outside a band is not seen)."""
    count = torch.zeros(q_rows + 1, k_rows + 1, dtype=torch.int64)  # + 1: max() of an empty plan is 0
    for t in tasks:
        count[t.q, t.k] += (t.band or Band()).dense(t.q_stop - t.q_start, t.k_stop - t.k_start).long()
    return count


def assert_equivalent(new, old, q_pos, k_pos, keep_positions):
    """``new`` serves exactly what ``old`` serves: the same partly visible calls (band and positions included),
    fully visible calls covering the same (query row, key row) pairs each exactly once, true positions wherever
    a call states them (always with ``keep_positions``), no more calls than before, in (q, k) order."""
    assert list(new) == sorted(new, key=_order), "calls out of (q_start, k_start) order"
    assert len(new) <= len(old)
    assert sorted((t for t in new if t.band is not None), key=repr) == sorted((t for t in old if t.band is not None),
                                                                              key=repr)
    assert torch.equal(coverage(new, len(q_pos), len(k_pos)), coverage(old, len(q_pos), len(k_pos)))
    assert int(coverage(new, len(q_pos), len(k_pos)).max()) <= 1, "a (q, k) pair is covered twice"
    for t in new:
        if keep_positions:
            assert t.positions is not None
        if t.positions is not None:
            delta, stride = t.positions
            i = torch.arange(t.q_start, t.q_stop).view(-1, 1)
            j = torch.arange(t.k_start, t.k_stop).view(1, -1)
            true = q_pos[t.q].view(-1, 1) - k_pos[t.k].view(1, -1)
            assert torch.equal(true, delta + stride * (i - t.q_start - (j - t.k_start))), t


# -- random cases ------------------------------------------------------------------------------------------
def _random_band(rng):
    causal = rng.random() < 0.6
    left = rng.choice([-1, -1, 0, 1, 2, 3, 5, 9, 17, 40, 1000])
    right = rng.choice([-1, -1, 0, 1, 4, 11, 1000])
    return Band.from_kernel_args(causal, (left, right), q_offset=rng.choice([0, 0, 0, 1, -2, 7]))


def _random_layout(rng, world_size, packed):
    base = get_layout(rng.choice(sorted(LAYOUTS)))
    unit = base.chunks_per_rank
    if not packed:
        return base, unit * rng.randint(1, 6)
    lengths = tuple(unit * rng.choice([0, 1, 1, 2, 3, 4, 7]) for _ in range(rng.randint(1, 7)))
    if not sum(lengths):
        lengths += (unit,)
    return PackedLayout(base, lengths), sum(lengths)


def _cases(count, seed):
    rng = random.Random(seed)
    for n in range(count):
        world_size = rng.randint(1, 8)
        layout, seqlen_local = _random_layout(rng, world_size, packed=n % 3 != 0)
        yield layout, world_size, seqlen_local, _random_band(rng), rng.random() < 0.3


CASES = list(_cases(400, seed=19))


@pytest.mark.parametrize("chunk", range(4))
def test_plans_match_the_old_planner(chunk):
    exact = 0
    for layout, world_size, seqlen_local, band, keep_positions in CASES[chunk::4]:
        for rank in range(world_size):
            q_pos = layout.positions(rank, world_size, seqlen_local)
            for src in range(world_size):
                new = plan_step(layout, rank, src, world_size, seqlen_local, band, keep_positions)
                old = old_plan_step(layout, rank, src, world_size, seqlen_local, band, keep_positions)
                assert_equivalent(new, old, q_pos, layout.positions(src, world_size, seqlen_local), keep_positions)
                exact += new == old
    assert exact > 0


def test_plans_are_the_old_ones_exactly_on_the_built_in_layouts():
    """On the variants' own layouts (and packed batches of them) the merged calls are not just equivalent but
    identical: the same kernel launches in the same order."""
    for layout, world_size, seqlen_local, band, keep_positions in CASES:
        for rank in range(world_size):
            for src in range(world_size):
                assert plan_step(layout, rank, src, world_size, seqlen_local, band, keep_positions) == \
                    old_plan_step(layout, rank, src, world_size, seqlen_local, band, keep_positions)


def test_all_ranks_band_answer_matches_the_old_one():
    answers = set()
    for layout, world_size, seqlen_local, band, _ in CASES:
        want = old_layout_needs_band_mask(layout, world_size, seqlen_local, band)
        assert layout_needs_band_mask(layout, world_size, seqlen_local, band) == want, (layout, world_size, band)
        answers.add(want)
    assert answers == {True, False}


def test_allgather_calls_make_the_old_planners_blocks():
    """The all-gather exchange's calls (every source's step calls, keys moved into the gathered K/V; batched, or
    variable-length calls) make exactly the old planner's blocks of every source."""
    for layout, world_size, seqlen_local, band, keep_positions in CASES[::5]:
        for rank in range(world_size):
            want = sorted(BlockTask(t.q_start, t.q_stop, src * seqlen_local + t.k_start, src * seqlen_local + t.k_stop,
                                    t.band, t.positions)
                          for src in range(world_size)
                          for t in old_plan_step(layout, rank, src, world_size, seqlen_local, band, keep_positions))
            for varlen in (False, True):
                calls = allgather_calls(layout, rank, world_size, seqlen_local, band, keep_positions, varlen)
                made = sorted(t for call in calls for t in (call.tasks if hasattr(call, "tasks") else (call,)))
                assert made == want, (layout, world_size, rank, varlen)


def test_arbitrary_blocks_merge_exactly_like_the_old_coalescing():
    """The merge itself, beyond the grids layouts produce: random fully visible and banded blocks on a grid of
    cuts, with positions that do and do not continue, give the old pairwise merge's calls exactly."""
    from ring_flash_attn.ring.planner import _coalesce

    rng = random.Random(5)
    for _ in range(1000):
        q_cuts = sorted(set(accumulate(rng.randint(1, 3) for _ in range(rng.randint(1, 6)))) | {0})
        k_cuts = sorted(set(accumulate(rng.randint(1, 3) for _ in range(rng.randint(1, 6)))) | {0})
        tasks = [BlockTask(qa, qb, ka, kb, Band(0, None, 0) if kind < 0.35 else None,
                           (rng.choice([qa - ka, 0, 1]), rng.choice([1, 1, 2])))
                 for qa, qb in zip(q_cuts, q_cuts[1:]) for ka, kb in zip(k_cuts, k_cuts[1:])
                 if (kind := rng.random()) >= 0.25]
        rng.shuffle(tasks)
        keep = rng.random() < 0.5
        assert _coalesce(list(tasks), keep) == _old_coalesce(list(tasks), keep)


def test_built_in_pair_geometries_are_the_enumerated_ones():
    """The closed forms of the built-in layouts list the same (query run, key run) pairs as enumerating every
    rank's runs (Layout.pair_geometries' default)."""
    from ring_flash_attn.ring.layouts import Layout

    for name in sorted(LAYOUTS):
        layout = get_layout(name)
        for world_size in range(1, 9):
            lengths = torch.tensor([layout.chunks_per_rank * n for n in (1, 2, 5, 12)])
            closed = torch.stack(layout.pair_geometries(world_size, lengths), -1)
            enumerated = torch.stack(Layout.pair_geometries(layout, world_size, lengths), -1)
            for row_closed, row_enumerated in zip(closed, enumerated):
                assert set(map(tuple, row_closed.tolist())) == set(map(tuple, row_enumerated.tolist()))


def test_zero_length_sequences_plan_nothing_and_shift_nothing():
    base = get_layout("zigzag")
    band = Band.from_kernel_args(True, (5, -1))
    with_empty, without = PackedLayout(base, (0, 4, 0, 0, 6, 0)), PackedLayout(base, (4, 6))
    with_empty.check(10, 3, True)
    assert torch.equal(with_empty.positions(1, 3, 10), without.positions(1, 3, 10))
    for rank in range(3):
        for src in range(3):
            assert plan_step(with_empty, rank, src, 3, 10, band) == plan_step(without, rank, src, 3, 10, band)
    assert layout_needs_band_mask(with_empty, 3, 10, band) == layout_needs_band_mask(without, 3, 10, band)


def test_planning_is_linear_in_the_number_of_sequences():
    """Thousands of sequences of distinct lengths plan in well under a second (the old planner took minutes at
    256): one rank's whole call, every step plus the all-ranks band answer, at P = 8."""
    rng = random.Random(3)
    world_size, band = 8, Band.from_kernel_args(True, (-1, -1))
    for name in sorted(LAYOUTS):
        lengths = tuple(get_layout(name).chunks_per_rank * rng.randint(1, 600) for _ in range(2048))
        layout = PackedLayout(get_layout(name), lengths)
        start = time.perf_counter()
        layout_needs_band_mask(layout, world_size, sum(lengths), band)
        for src in range(world_size):
            plan_step(layout, world_size - 1, src, world_size, sum(lengths), band)
        assert time.perf_counter() - start < 2.0, name
