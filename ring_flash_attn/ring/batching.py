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
share no query row and no key row, so the write-backs and index-adds of a batch touch each row once: the
result does not depend on the order a GPU's atomics take (deterministic=True holds).
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


# One batch's P sources, reused by its layers and its backward. Smaller than the plans' cache: a batch's
# calls hold their row indices on the device (up to 16 bytes x P x local tokens per batch), and training never
# returns to an earlier batch's layout. P > 64 still works, planning each step again.
@lru_cache(maxsize=64)
def step_calls(layout, rank: int, src: int, world_size: int, seqlen_local: int, band,
               keep_positions: bool = False) -> Tuple[Call, ...]:
    """The kernel calls rank ``rank`` makes on the K/V of rank ``src``: :func:`~ring_flash_attn.ring.planner.
    plan_step`'s blocks, the small ones of one shape batched (a packed batch is batched as it is planned)."""
    if isinstance(layout, PackedLayout):
        return _packed_calls(layout, rank, src, world_size, band, keep_positions)
    return batch_calls(plan_step(layout, rank, src, world_size, seqlen_local, band, keep_positions))


PLAN_CACHES.append(step_calls)


def _packed_calls(layout: PackedLayout, rank: int, src: int, world_size: int, band, keep_positions: bool):
    """A packed step's calls, batched from the per-length plans without placing each sequence's blocks first.

    Each sequence's blocks are its base layout's for its length, moved to where the sequence starts
    (planner._plan_packed); so one base block over all sequences of a length is one batch, and base blocks of
    the same shape from other lengths join it (other sequences: other rows). Two base blocks of one length
    whose query rows or key rows overlap (one sequence's rows) go to different batches. Blocks of a shape
    that has fewer than MIN_BATCHED_CALLS in all are made one by one.
    """
    starts_by_length = {}
    local_start = 0
    for length in layout.seqlens_local:
        if length:
            starts_by_length.setdefault(length, []).append(local_start)
        local_start += length
    by_shape = {}  # (q_len, k_len, band, positions) -> [blocks over all sequences, [(length, base block, starts)]]
    for length, starts in starts_by_length.items():
        for task in _base_plan(layout.base, rank, src, world_size, length, band, keep_positions):
            key = (task.q_stop - task.q_start, task.k_stop - task.k_start, task.band, task.positions)
            entry = by_shape.get(key)
            if entry is None:
                by_shape[key] = [len(starts), [(length, task, starts)]]
            else:
                entry[0] += len(starts)
                entry[1].append((length, task, starts))
    calls = []
    make = tuple.__new__  # BlockTask(...) without the named tuple's argument handling
    for (q_len, k_len, task_band, positions), (count, members) in by_shape.items():
        if count < MIN_BATCHED_CALLS or q_len > MAX_BATCHED_ROWS:
            for _, (q_start, q_stop, k_start, k_stop, _, _), starts in members:
                calls.extend([make(BlockTask, (q_start + s, q_stop + s, k_start + s, k_stop + s, task_band, positions))
                              for s in starts])
            continue
        batches = []  # [(q_starts, k_starts)]
        blocks_by_length = {}  # length -> per batch, the base blocks it holds
        for length, task, starts in members:
            used = blocks_by_length.setdefault(length, [])
            n = 0
            while n < len(used) and any(_overlap(task, other) for other in used[n]):
                n += 1
            if n == len(used):
                used.append([])
            used[n].append(task)
            if n == len(batches):
                batches.append(([], []))
            batches[n][0].extend([task.q_start + s for s in starts])
            batches[n][1].extend([task.k_start + s for s in starts])
        for q_starts, k_starts in batches:
            if len(q_starts) >= MIN_BATCHED_CALLS:
                calls.append(TaskBatch(q_len, k_len, task_band, positions, q_starts, k_starts))
            else:
                calls.extend(make(BlockTask, (q, q + q_len, k, k + k_len, task_band, positions))
                             for q, k in zip(q_starts, k_starts))
    return tuple(calls)


def _overlap(a: BlockTask, b: BlockTask) -> bool:
    """Whether two blocks share a query row or a key row."""
    return (a.q_start < b.q_stop and b.q_start < a.q_stop) or (a.k_start < b.k_stop and b.k_start < a.k_stop)


class _Starts:
    """Start rows of equal-length row ranges, bucketed by ``start // length``: a range can overlap only ranges
    of its own bucket and the two beside it, so a clash is found in constant time."""

    __slots__ = ("length", "buckets")

    def __init__(self, length: int):
        self.length, self.buckets = length, {}

    def clashes(self, start: int) -> bool:
        bucket, length, get = start // self.length, self.length, self.buckets.get
        for starts in (get(bucket - 1), get(bucket), get(bucket + 1)):
            if starts:
                for other in starts:
                    if -length < other - start < length:
                        return True
        return False

    def add(self, start: int) -> None:
        self.buckets.setdefault(start // self.length, []).append(start)


def batch_calls(tasks: Tuple[BlockTask, ...]) -> Tuple[Call, ...]:
    """``tasks`` (one ring step's calls) with the small calls of equal shape grouped into :class:`TaskBatch`es.

    Calls are grouped by shape in one pass; within a shape, taken by query row, a call goes to the first batch
    where it shares no query row and no key row with a call already there (constant time per batch tried).
    Not cached: callers cache the result with their plan.
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
        k_len = group[0].k_stop - group[0].k_start
        batches = []  # [tasks, end of the last query rows, their key starts]: by query start, so a call's
        for task in group:  # rows are free in a batch iff the batch's last call ends before them
            for batch in batches:
                if batch[1] <= task.q_start and not batch[2].clashes(task.k_start):
                    break
            else:
                batch = [[], 0, _Starts(k_len)]
                batches.append(batch)
            batch[0].append(task)
            batch[1] = task.q_stop
            batch[2].add(task.k_start)
        for batch_tasks, _, _ in batches:
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
