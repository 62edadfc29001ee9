"""Many small kernel calls of one ring step as a few batched ones.

A packed batch of many short sequences plans one call per sequence per ring step (per (query run, key
run) pair of a sequence), and on a GPU each call costs a launch and its host work, far more than the
arithmetic of a short block: a thousand 16-token documents took 100-300x the time of one block-diagonal
call (benchmarks/RESULTS.md). Calls of the same shape (query rows, key rows, index-space band, positions)
do the same arithmetic on different rows, so they are one call of the kernel on a batch: their rows are
gathered into ``[n, L, H, D]`` (``[B * n, ...]`` for a batch of B) tensors, the kernel runs once, and the
results go back to their rows (written for the forward's accumulators, added for the gradients).

Only small blocks are batched: gathering copies the rows, which for long blocks costs more memory traffic
than the launches it saves (and the few calls of an unpacked layout are long blocks). Calls batched together
never share query rows, so the forward's accumulator rows they write back are disjoint.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Tuple, Union

import torch

from .layouts import PackedLayout
from .planner import PLAN_CACHES, BlockTask, _base_plan, plan_step

# Blocks of at most this many query rows are batched. A gathered block of 1024 rows x 32 heads x 128 dims is
# 8 MiB in bfloat16, copied in a few microseconds on a GPU, about the host time of one call it saves; longer
# blocks are already long enough to keep a device busy on their own.
MAX_BATCHED_ROWS = 1024
# Fewer calls than this stay as they are: the gathers and write-backs of a batch are about seven small
# device operations, which two or three calls of the kernel cost too. (So only packed batches of many
# sequences are batched; an unpacked layout has at most two calls of one shape per step.)
MIN_BATCHED_CALLS = 4


class TaskBatch:
    """Kernel calls of one shape (``q_len`` x ``k_len`` rows, ``band``, ``positions``) on disjoint query rows,
    made as one call on a batch of their rows; call i covers query rows ``q_starts[i] + [0, q_len)`` and key
    rows ``k_starts[i] + [0, k_len)``."""

    __slots__ = ("q_len", "k_len", "band", "positions", "q_starts", "k_starts", "_indices")

    def __init__(self, q_len: int, k_len: int, band, positions, q_starts: list, k_starts: list):
        self.q_len, self.k_len, self.band, self.positions = q_len, k_len, band, positions
        self.q_starts, self.k_starts = q_starts, k_starts
        self._indices = {}

    @classmethod
    def of(cls, tasks) -> "TaskBatch":
        first = tasks[0]
        return cls(first.q_stop - first.q_start, first.k_stop - first.k_start, first.band, first.positions,
                   [t.q_start for t in tasks], [t.k_start for t in tasks])

    @property
    def tasks(self) -> Tuple[BlockTask, ...]:
        """The calls this batch makes, one block each."""
        return tuple(BlockTask(q, q + self.q_len, k, k + self.k_len, self.band, self.positions)
                     for q, k in zip(self.q_starts, self.k_starts))

    def __len__(self) -> int:
        return len(self.q_starts)

    def kernel_mask_args(self) -> dict:
        return BlockTask(0, self.q_len, 0, self.k_len, self.band, self.positions).kernel_mask_args()

    def indices(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Row indices ``(query rows, key rows)``, call after call, on ``device`` (made once per device)."""
        found = self._indices.get(device)
        if found is None:
            q_starts = torch.tensor(self.q_starts, dtype=torch.int64)
            k_starts = torch.tensor(self.k_starts, dtype=torch.int64)
            found = ((q_starts[:, None] + torch.arange(self.q_len)).reshape(-1).to(device),
                     (k_starts[:, None] + torch.arange(self.k_len)).reshape(-1).to(device))
            self._indices[device] = found
        return found


Call = Union[BlockTask, TaskBatch]


@lru_cache(maxsize=256)  # as the packed plans: one batch's P sources, reused by its layers and its backward
def step_calls(layout, rank: int, src: int, world_size: int, seqlen_local: int, band,
               keep_positions: bool = False) -> Tuple[Call, ...]:
    """The kernel calls rank ``rank`` makes on the K/V of rank ``src``: :func:`~ring_flash_attn.ring.planner.
    plan_step`'s blocks, the small ones of one shape batched (a packed batch is batched as it is planned)."""
    if isinstance(layout, PackedLayout):
        return _packed_calls(layout, rank, src, world_size, band, keep_positions)
    return batch_calls(plan_step(layout, rank, src, world_size, seqlen_local, band, keep_positions))


PLAN_CACHES.append(step_calls)


class _Batching:
    """Blocks of one shape gathered into batches whose query rows stay disjoint (interval partitioning)."""

    __slots__ = ("batches",)

    def __init__(self):
        self.batches = []  # [q_starts, k_starts, {query row range of one sequence's block: True}]

    def add(self, q_start: int, q_stop: int, k_start: int, starts) -> None:
        """The block ``(q_start, q_stop, k_start)`` of every sequence starting at one of ``starts`` (local
        rows; the sequences are disjoint, so only two blocks of one sequence can overlap)."""
        for q_starts, k_starts, ranges in self.batches:
            if not any(a < q_stop and q_start < b for a, b in ranges):
                break
        else:
            q_starts, k_starts, ranges = [], [], []
            self.batches.append((q_starts, k_starts, ranges))
        ranges.append((q_start, q_stop))
        q_starts.extend([q_start + s for s in starts])
        k_starts.extend([k_start + s for s in starts])


def _packed_calls(layout: PackedLayout, rank: int, src: int, world_size: int, band, keep_positions: bool):
    """A packed step's calls, batched from the per-length plans without placing each sequence's blocks.

    Each sequence's blocks are its base layout's for its length, moved to where the sequence starts
    (planner._plan_packed); so the blocks of one base block over all sequences of a length are one batch,
    and base blocks of one shape from several lengths join it. Blocks of one sequence that share query rows
    go to different batches. A batch of fewer than MIN_BATCHED_CALLS blocks is made block by block.
    """
    starts_by_length = {}
    local_start = 0
    for length in layout.seqlens_local:
        if length:
            starts_by_length.setdefault(length, []).append(local_start)
        local_start += length
    by_shape, single = {}, []
    for length, starts in starts_by_length.items():
        for task in _base_plan(layout.base, rank, src, world_size, length, band, keep_positions):
            q_len, k_len = task.q_stop - task.q_start, task.k_stop - task.k_start
            if q_len > MAX_BATCHED_ROWS:
                single.extend(task.shifted(start, start) for start in starts)
                continue
            key = (q_len, k_len, task.band, task.positions)
            batching = by_shape.get(key)
            if batching is None:
                batching = by_shape[key] = {}
            # per length: blocks of one sequence may overlap only with blocks of the same length
            batching.setdefault(length, _Batching()).add(task.q_start, task.q_stop, task.k_start, starts)
    calls = []
    for (q_len, k_len, task_band, positions), per_length in by_shape.items():
        # the n-th batch of every length: disjoint rows (different sequences), one call
        for n in range(max(len(b.batches) for b in per_length.values())):
            q_starts, k_starts = [], []
            for batching in per_length.values():
                if n < len(batching.batches):
                    q_starts.extend(batching.batches[n][0])
                    k_starts.extend(batching.batches[n][1])
            if len(q_starts) >= MIN_BATCHED_CALLS:
                calls.append(TaskBatch(q_len, k_len, task_band, positions, q_starts, k_starts))
            else:  # tuple.__new__: BlockTask(...) without the named tuple's argument handling
                calls.extend(tuple.__new__(BlockTask, (q, q + q_len, k, k + k_len, task_band, positions))
                             for q, k in zip(q_starts, k_starts))
    calls.extend(single)
    return tuple(calls)


def batch_calls(tasks: Tuple[BlockTask, ...]) -> Tuple[Call, ...]:
    """``tasks`` (one ring step's calls) with the small calls of equal shape grouped into :class:`TaskBatch`es.

    Linear in the number of calls: calls are grouped by shape in one pass; within a shape, calls whose query
    rows overlap an earlier call's go to another batch (interval partitioning over calls sorted by row).
    """
    if len(tasks) < MIN_BATCHED_CALLS:
        return tasks
    by_shape = {}
    kept = []
    for task in tasks:
        rows = task.q_stop - task.q_start
        if rows > MAX_BATCHED_ROWS:
            kept.append(task)
            continue
        by_shape.setdefault((rows, task.k_stop - task.k_start, task.band, task.positions), []).append(task)
    calls, batched = list(kept), False
    for group in by_shape.values():
        if len(group) < MIN_BATCHED_CALLS:
            calls.extend(group)
            continue
        group.sort(key=lambda t: t.q_start)
        batches = []  # [tasks, end of the last query row range]
        for task in group:
            for batch in batches:
                if batch[1] <= task.q_start:
                    batch[0].append(task)
                    batch[1] = task.q_stop
                    break
            else:
                batches.append([[task], task.q_stop])
        for batch_tasks, _ in batches:
            if len(batch_tasks) < MIN_BATCHED_CALLS:
                calls.extend(batch_tasks)
            else:
                calls.append(TaskBatch.of(batch_tasks))
                batched = True
    return tuple(calls) if batched else tasks  # nothing to batch: the planner's calls in the planner's order


def gather_rows(x: torch.Tensor, index: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    """The rows ``index`` of ``x`` along ``dim`` (the sequence dim), as a batch: ``[B, S, H, D]`` ->
    ``[B * n, length, H, D]``; ``[B, H, S]`` (LSE, ``dim=2``) -> ``[B * n, H, length]``."""
    picked = x.index_select(dim, index)
    n = index.numel() // length
    if dim == 1:
        return picked.reshape(x.shape[0] * n, length, *x.shape[2:])
    return picked.reshape(x.shape[0], x.shape[1], n, length).transpose(1, 2).reshape(x.shape[0] * n, x.shape[1], length)


def _ungathered(value: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of :func:`gather_rows`'s reshape: a batch back to ``like``'s layout with the rows along ``dim``."""
    batch = like.shape[0]
    if dim == 1:
        return value.reshape(batch, -1, *like.shape[2:])
    n, heads, length = value.shape[0] // batch, like.shape[1], value.shape[2]
    return value.reshape(batch, n, heads, length).transpose(1, 2).reshape(batch, heads, n * length)


def put_rows(dst: torch.Tensor, index: torch.Tensor, value: torch.Tensor, dim: int = 1) -> None:
    """Write a batch (from :func:`gather_rows`) back to its rows of ``dst``, in place."""
    dst.index_copy_(dim, index, _ungathered(value, dst, dim).to(dst.dtype))


def add_rows(dst: torch.Tensor, index: torch.Tensor, value: torch.Tensor, dim: int = 1) -> None:
    """Add a batch to its rows of ``dst`` in place (rows repeated in ``index`` get every addend)."""
    dst.index_add_(dim, index, _ungathered(value, dst, dim).to(dst.dtype))
