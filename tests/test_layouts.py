"""Layouts: which tokens each rank holds, shard/unshard round trips, and the planner's kernel calls."""

import pytest
import torch

from ring_flash_attn import shard_sequence, unshard_sequence
from ring_flash_attn.kernels.mask import Band
from ring_flash_attn.ring.layouts import LAYOUTS, get_layout
from ring_flash_attn.ring.planner import plan_step


@pytest.mark.parametrize("variant", sorted(LAYOUTS))
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_unshard_round_trip(variant, world_size):
    x = torch.randn(2, 12 * world_size, 3, 5)
    shards = [shard_sequence(x, variant, r, world_size) for r in range(world_size)]
    assert all(s.shape == (2, 12, 3, 5) for s in shards)
    assert torch.equal(unshard_sequence(shards, variant), x)


@pytest.mark.parametrize("variant", sorted(LAYOUTS))
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_position_held_exactly_once(variant, world_size):
    layout = get_layout(variant)
    positions = torch.cat([layout.positions(r, world_size, 6) for r in range(world_size)])
    assert torch.equal(positions.sort().values, torch.arange(6 * world_size))


def test_zigzag_holds_chunks_r_and_2p_minus_1_minus_r():
    x = torch.arange(16).view(1, 16)
    assert shard_sequence(x, "zigzag", 1, 4).tolist() == [[2, 3, 12, 13]]
    assert shard_sequence(x, "stripe", 1, 4).tolist() == [[1, 5, 9, 13]]
    assert shard_sequence(x, "ring", 1, 4).tolist() == [[4, 5, 6, 7]]


def test_shard_rejects_lengths_that_do_not_split():
    with pytest.raises(ValueError, match="seqlen: the 'zigzag' layout .* multiple of 6, got 8"):
        shard_sequence(torch.zeros(1, 8), "zigzag", 0, 3)
    with pytest.raises(ValueError, match="variant: expected one of"):
        shard_sequence(torch.zeros(1, 8), "spiral", 0, 2)


@pytest.mark.parametrize("variant", sorted(LAYOUTS))
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("window", [(-1, -1), (5, -1), (0, 0)])
def test_plan_covers_exactly_the_visible_pairs(variant, world_size, window):
    """Over all steps, the planned calls of every rank cover each visible (query, key) pair once, and no
    call is issued for a block with nothing visible."""
    seqlen_local = 6
    layout = get_layout(variant)
    band = Band.from_kernel_args(True, window)
    total = seqlen_local * world_size
    pos = torch.arange(total)
    d = pos.view(-1, 1) - pos.view(1, -1)
    want = (d >= 0) & ((d <= window[0]) if window[0] >= 0 else True)
    got = torch.zeros(total, total, dtype=torch.int64)
    for rank in range(world_size):
        q_pos = layout.positions(rank, world_size, seqlen_local)
        for src in range(world_size):
            k_pos = layout.positions(src, world_size, seqlen_local)
            for task in plan_step(layout, rank, src, world_size, seqlen_local, band):
                block_band = task.band or Band()
                visible = block_band.dense(task.q_stop - task.q_start, task.k_stop - task.k_start)
                assert visible.any(), "a call was planned for an empty block"
                qi, kj = q_pos[task.q].view(-1, 1), k_pos[task.k].view(1, -1)
                got[qi.expand_as(visible)[visible], kj.expand_as(visible)[visible]] += 1
    assert torch.equal(got, want.long())
