"""How a sequence is laid out over the ranks of a ring.

A layout says which global token positions each rank holds, as a few *runs*:
stretches of local tokens whose positions form an arithmetic progression. The
ring planner needs nothing else to work out, for any pair of ranks, which
(query run, key run) pairs are fully visible, partly visible or empty under a
causal/window mask. Variants differ only here: the engine, communication,
merge and backward are shared.

* ``ring``   contiguous shards: rank r holds [r*S, (r+1)*S). Simple; under a
             causal mask rank P-1 does P times the work of rank 0.
* ``zigzag`` 2P chunks; rank r holds chunks r and 2P-1-r, so every rank does the
             same causal work. Causal only.
* ``stripe`` token t lives on rank t mod P (positions r, r+P, r+2P, ...):
             balanced causal work with one kernel call per step. Causal only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Tuple

import torch

from ..validation import check_dim, check_rank


class Run(NamedTuple):
    """``length`` local tokens from ``local_start``, at positions ``global_start + stride * i``.

    Tokens of different ``segment`` s (packed sequences) never see each other. (A named tuple: the planner
    makes a few per sequence and step.)
    """

    local_start: int
    length: int
    global_start: int
    stride: int = 1
    segment: int = 0


class Layout:
    name: str = ""
    causal_only: bool = False
    description: str = ""

    def check(self, seqlen_local: int, world_size: int, causal: bool) -> None:
        """Raise ValueError (naming the argument) if this layout cannot hold the sequence."""
        if self.causal_only and not causal:
            raise ValueError(f"causal: the {self.name!r} layout only balances causal attention and needs "
                             f"causal=True, got causal=False (use the 'ring' layout for non-causal attention)")
        if seqlen_local < 1:
            raise ValueError(f"seqlen: expected at least 1 local token per rank, got {seqlen_local}")

    def runs(self, rank: int, world_size: int, seqlen_local: int) -> Tuple[Run, ...]:
        raise NotImplementedError

    def pair_geometries(self, world_size: int, seqlens_local: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``(q_len, k_len, delta, stride)``, int64 tensors ``[len(seqlens_local), pairs]``: for each local
        length, every (query run of any rank, key run of any rank) pair of one segment, as lengths, position
        offset ``q.global_start - k.global_start`` and stride; pairs absent for a length have length 0.

        All that decides whether a pair's call needs a mask (ring.planner.layout_needs_band_mask). This
        default enumerates the runs of every rank; the built-in layouts give the same pairs in closed form.
        """
        rows = []
        for seqlen_local in seqlens_local.tolist():
            runs = [run for rank in range(world_size) for run in self.runs(rank, world_size, seqlen_local)]
            row = []
            for q in runs:
                for k in runs:
                    if q.segment == k.segment:
                        if q.stride != k.stride:
                            raise ValueError("layouts with different strides on different ranks are not supported")
                        row.append((q.length, k.length, q.global_start - k.global_start, q.stride))
            rows.append(row)
        width = max(len(row) for row in rows)
        table = torch.tensor([row + [(0, 0, 0, 1)] * (width - len(row)) for row in rows], dtype=torch.int64)
        return tuple(table.unbind(-1))

    def positions(self, rank: int, world_size: int, seqlen_local: int, device=None) -> torch.Tensor:
        """Global positions of this rank's local tokens, in local order."""
        parts = [run.global_start + run.stride * torch.arange(run.length, device=device)
                 for run in self.runs(rank, world_size, seqlen_local)]
        return torch.cat(parts)

    def check_global(self, seqlen_global: int, world_size: int) -> int:
        """Local length for a global sequence length, or ValueError if it does not split."""
        unit = world_size * self.chunks_per_rank
        if seqlen_global % unit:
            raise ValueError(f"seqlen: the {self.name!r} layout splits a sequence into {unit} equal parts over "
                             f"{world_size} ranks; the length must be a multiple of {unit}, got {seqlen_global}")
        return seqlen_global // world_size

    chunks_per_rank: int = 1

    def shard(self, x: torch.Tensor, rank: int, world_size: int, dim: int = 1) -> torch.Tensor:
        """This rank's slice of a full sequence ``x`` (sequence along ``dim``)."""
        check_rank(rank, world_size)
        dim = check_dim(dim, x)
        seqlen_local = self.check_global(x.shape[dim], world_size)
        index = self.positions(rank, world_size, seqlen_local, device=x.device)
        return x.index_select(dim, index)

    def unshard(self, shards: List[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """Inverse of :meth:`shard`: the full sequence from every rank's slice, in rank order."""
        if not shards or not all(isinstance(t, torch.Tensor) for t in shards):
            raise ValueError(f"shards: expected every rank's slice (tensors, in rank order), got {shards!r}")
        dim = check_dim(dim, shards[0], "shards[0]")
        if len({t.shape for t in shards}) > 1:
            raise ValueError(f"shards: expected slices of one shape, got {[tuple(t.shape) for t in shards]}")
        world_size = len(shards)
        seqlen_local = shards[0].shape[dim]
        positions = torch.cat([self.positions(r, world_size, seqlen_local, device=shards[0].device)
                               for r in range(world_size)])
        order = torch.argsort(positions)
        return torch.cat(shards, dim=dim).index_select(dim, order)


class ContiguousLayout(Layout):
    name = "ring"
    description = "contiguous shards; causal or not"

    def runs(self, rank, world_size, seqlen_local):
        return (Run(0, seqlen_local, rank * seqlen_local),)

    def pair_geometries(self, world_size, seqlens_local):
        # rank r against rank s: two runs of L tokens, (r - s) * L apart
        length = seqlens_local.view(-1, 1)
        apart = torch.arange(1 - world_size, world_size).view(1, -1)
        return _geometry(length, length, apart * length, 1)


class ZigzagLayout(Layout):
    name = "zigzag"
    causal_only = True
    chunks_per_rank = 2
    description = "chunks r and 2P-1-r; balanced causal work"

    def check(self, seqlen_local, world_size, causal):
        super().check(seqlen_local, world_size, causal)
        if seqlen_local % 2:
            raise ValueError(f"seqlen: the 'zigzag' layout holds two equal chunks per rank, so the local sequence "
                             f"length must be even, got {seqlen_local}")

    def runs(self, rank, world_size, seqlen_local):
        chunk = seqlen_local // 2
        return (Run(0, chunk, rank * chunk), Run(chunk, chunk, (2 * world_size - 1 - rank) * chunk))

    def pair_geometries(self, world_size, seqlens_local):
        # every chunk a against every chunk b (the ranks together hold all 2P): (a - b) * chunk apart
        chunk = (seqlens_local // 2).view(-1, 1)
        apart = torch.arange(1 - 2 * world_size, 2 * world_size).view(1, -1)
        return _geometry(chunk, chunk, apart * chunk, 1)


class StripeLayout(Layout):
    name = "stripe"
    causal_only = True
    description = "token t on rank t mod P; balanced causal work"

    def runs(self, rank, world_size, seqlen_local):
        return (Run(0, seqlen_local, rank, world_size),)

    def pair_geometries(self, world_size, seqlens_local):
        # rank r against rank s: L tokens each, strided by P, starting r - s apart
        length = seqlens_local.view(-1, 1)
        apart = torch.arange(1 - world_size, world_size).view(1, -1)
        return _geometry(length, length, apart, world_size)


def _geometry(q_len, k_len, delta, stride):
    """Broadcast to one ``[lengths, pairs]`` shape, as :meth:`Layout.pair_geometries` returns."""
    return torch.broadcast_tensors(q_len, k_len, delta, torch.as_tensor(stride, dtype=torch.int64))


class DerivedLayout(Layout):
    """A layout built on a ``base`` layout (packed sequences, a Ulysses mesh's ring view): it keeps the base's
    name and causal-only rule."""

    base: Layout

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def causal_only(self) -> bool:
        return self.base.causal_only


@dataclass(frozen=True)
class PackedLayout(DerivedLayout):
    """Packed variable-length sequences, each laid out over the ranks by ``base``.

    ``seqlens_local`` are the per-rank lengths of the packed sequences (every
    rank holds the same share of each sequence: 1/P of it), i.e. the
    differences of the local ``cu_seqlens``. Positions are global positions in
    the packed batch; ``segment`` keeps sequences apart. A sequence of length 0
    (a repeated offset in ``cu_seqlens``, as padding makes) holds no token and
    has no runs.
    """

    base: Layout
    seqlens_local: Tuple[int, ...]

    def check(self, seqlen_local, world_size, causal):
        if seqlen_local != sum(self.seqlens_local):
            raise ValueError(f"cu_seqlens: expected to end at the local token count {seqlen_local}, "
                             f"got {sum(self.seqlens_local)}")
        for n, length in enumerate(self.seqlens_local):
            if length == 0:
                continue
            try:
                self.base.check(length, world_size, causal)
            except ValueError as exc:
                raise ValueError(f"cu_seqlens: sequence {n} (local length {length}) does not fit the "
                                 f"{self.base.name!r} layout: {exc}") from None

    def runs(self, rank, world_size, seqlen_local):
        runs, local_start = [], 0
        for segment, length in enumerate(self.seqlens_local):
            global_start = local_start * world_size
            for run in self.base.runs(rank, world_size, length) if length else ():
                runs.append(Run(local_start + run.local_start, run.length, global_start + run.global_start,
                                run.stride, segment))
            local_start += length
        return tuple(runs)

    def check_global(self, seqlen_global, world_size):
        if seqlen_global != world_size * sum(self.seqlens_local):
            raise ValueError(f"seqlen: expected {world_size * sum(self.seqlens_local)} packed tokens, got {seqlen_global}")
        return seqlen_global // world_size


LAYOUTS: Dict[str, Layout] = {layout.name: layout for layout in (ContiguousLayout(), ZigzagLayout(), StripeLayout())}


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"variant: expected one of {sorted(LAYOUTS)}, got {name!r}") from None
