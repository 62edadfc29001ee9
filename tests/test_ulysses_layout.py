"""The ring's view of a ulysses x ring mesh (ring_flash_attn.ulysses.UlyssesLayout), on one process.

For every layout and mesh shape (odd sizes included): each ring rank's runs describe exactly the tokens its U
context-parallel ranks hold, in the order the all-to-all leaves them (reordered only where that gives fewer
runs), every token of the sequence belongs to one ring rank, and the balanced layouts keep their runs few.
"""

import itertools

import pytest
import torch

from ring_flash_attn.ring.layouts import PackedLayout, get_layout
from ring_flash_attn.ulysses import UlyssesLayout, _reorder

MESHES = [(u, r) for u, r in itertools.product((1, 2, 3, 4), (1, 2, 3)) if u * r > 1]
BASES = [("ring", None), ("zigzag", None), ("stripe", None), ("zigzag", (2, 4, 6)), ("stripe", (3, 1)),
         ("ring", (1, 5))]


def _base(name, seqlens_in_units, world):
    """The base layout and a local length: packed sequences of ``units`` x 2 tokens per rank each."""
    layout = get_layout(name)
    if seqlens_in_units is None:
        return layout, 6
    seqlens = tuple(2 * n for n in seqlens_in_units)
    return PackedLayout(layout, seqlens), sum(seqlens)


@pytest.mark.parametrize("name, packed", BASES, ids=[f"{n}-{p}" for n, p in BASES])
@pytest.mark.parametrize("ulysses, ring", MESHES, ids=[f"{u}x{r}" for u, r in MESHES])
def test_runs_describe_the_gathered_tokens(name, packed, ulysses, ring):
    world = ulysses * ring
    base, seqlen_local = _base(name, packed, world)
    gathered_layout = UlyssesLayout(base, ulysses)
    everyone = []
    for ring_rank in range(ring):
        gathered = torch.cat([base.positions(ring_rank * ulysses + u, world, seqlen_local) for u in range(ulysses)])
        reorder = _reorder(base, ulysses, ring, seqlen_local, ring_rank, torch.device("cpu"))
        if reorder is not None:
            order, inverse = reorder
            assert torch.equal(order[inverse], torch.arange(order.numel()))
            gathered = gathered[order]
        runs = gathered_layout.runs(ring_rank, ring, ulysses * seqlen_local)
        assert torch.equal(gathered_layout.positions(ring_rank, ring, ulysses * seqlen_local), gathered)
        assert len({run.stride for run in runs}) == 1
        assert sum(run.length for run in runs) == ulysses * seqlen_local
        everyone.append(gathered)
        if packed is None and name in ("ring", "zigzag"):
            # contiguous stays one run per ring rank; zigzag becomes zigzag over the ring: at most two
            assert len(runs) <= (1 if name == "ring" else 2), runs
        if packed is None and ring == 1:
            assert len(runs) == 1, runs  # Ulysses alone attends over the whole sequence in one run
    assert torch.equal(torch.cat(everyone).sort().values, torch.arange(world * seqlen_local))
