"""Many small kernel calls of one ring step as a few batched ones.

A packed batch of many short sequences plans one call per sequence per ring step (per (query run, key
run) pair of a sequence), and on a GPU each call costs a launch and its host work, far more than the
arithmetic of a short block: a thousand 16-token documents took 100-300x the time of one block-diagonal
call (benchmarks/RESULTS.md). Calls of the same shape (query rows, key rows, index-space band, positions)
do the same arithmetic on different rows, so they are one call of the kernel on a batch: their rows are
gathered into ``[n, L, H, D]`` (``[B * n, ...]`` for a batch of B) tensors, the kernel runs once, and the
results go back to their rows (written for the forward's accumulators, added for the gradients).

Where the backend has a variable-length kernel (FlashAttention-2's, for bf16/fp16 on CUDA), a packed step's
small unmasked blocks of every length are one call, and its small causal squares another
(:class:`VarlenBatch`): blocks packed along the token dim with their offsets, no padding, so mixed lengths
cost no more calls than equal ones.

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
# A batch holds at most this many calls: the fused kernels put the batch on a grid axis that CUDA limits to
# 65535 (flash and memory-efficient attention), and a batch of B sequences is B x (its calls) there.
MAX_CALLS_PER_BATCH = 16384


class TaskBatch:
    """Kernel calls of one shape (``q_len`` x ``k_len`` rows, ``band``, ``positions``) on disjoint query rows,
    made as one call on a batch of their rows; call i covers query rows ``q_starts[i] + [0, q_len)`` and key
    rows ``k_starts[i] + [0, k_len)``."""

    __slots__ = ("q_len", "k_len", "band", "positions", "q_starts", "k_starts", "_rows", "_slot")

    def __init__(self, q_len: int, k_len: int, band, positions, q_starts: list, k_starts: list):
        self.q_len, self.k_len, self.band, self.positions = q_len, k_len, band, positions
        self.q_starts, self.k_starts = q_starts, k_starts
        self._rows, self._slot = None, 0

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
        """Row indices ``(query rows, key rows)``, call after call, on ``device`` (made once per device, with
        those of the other batches of its ring step)."""
        if self._rows is None:
            share_rows((self,))
        return self._rows.on(device)[self._slot]


class _StepRows:
    """The row indices of the batches of one ring step, made for all of them at once on each device.

    A packed batch of a thousand sequences of distinct lengths makes over a thousand batches in its P steps;
    made one by one (a few small tensors and two copies to the device each), their indices took 80 ms of host
    time per new packed batch on a CPU, ten times its planning. Here a step's indices are two flat tensors made
    by a few vectorized operations and copied to the device once; each batch's are views of them.
    """

    __slots__ = ("batches", "_by_device")

    def __init__(self, batches):
        self.batches, self._by_device = batches, {}

    def on(self, device: torch.device) -> list:
        found = self._by_device.get(device)
        if found is None:
            found = self._by_device[device] = self._made(device)
        return found

    def _made(self, device: torch.device) -> list:
        batches = self.batches
        counts = [len(b) for b in batches]
        q_lens, k_lens = [b.q_len for b in batches], [b.k_len for b in batches]
        blocks = sum(counts)
        # One copy to the device of what the indices are made of; the indices themselves (as many as the
        # step's batched rows) are made there, with every output size given, so nothing waits for the device.
        made_of = torch.tensor([*(s for b in batches for s in b.q_starts), *(s for b in batches for s in b.k_starts),
                                *q_lens, *k_lens, *counts], dtype=torch.int64).to(device)
        q_starts, k_starts, q_lens_t, k_lens_t, counts_t = made_of.split([blocks, blocks, *[len(batches)] * 3])
        sides = []
        for starts, lens, lens_t in ((q_starts, q_lens, q_lens_t), (k_starts, k_lens, k_lens_t)):
            sizes = [n * length for n, length in zip(counts, lens)]
            block_rows = torch.repeat_interleave(lens_t, counts_t, output_size=blocks)
            sides.append(_ranges(starts, block_rows, sum(sizes)).split(sizes))
        return list(zip(*sides))


def _ranges(starts: torch.Tensor, lengths: torch.Tensor, rows: int) -> torch.Tensor:
    """The rows of the ranges ``[start_i, start_i + length_i)``, range after range, made on ``starts``' device
    (``rows`` = the sum of the lengths, known on the host: nothing waits for the device)."""
    # row j of the result is in range i: its value is start_i + (j - the first row of range i)
    shift = starts - (torch.cumsum(lengths, 0) - lengths)
    return torch.arange(rows, device=starts.device) + torch.repeat_interleave(shift, lengths, output_size=rows)


class VarlenBatch:
    """Blocks of one ring step with any lengths, all unmasked or all causal squares (``causal``), on disjoint
    query rows and disjoint key rows: one call of a backend's variable-length kernel (``KernelBackend.forward_varlen``, e.g.
    FlashAttention-2's), where batches of one shape (:class:`TaskBatch`) would be a call per shape. Its query
    rows are gathered block after block into ``[Tq, H, D]``, its key rows into ``[Tk, Hk, D]``."""

    __slots__ = ("causal", "members", "q_starts", "q_lens", "k_starts", "k_lens", "max_q", "max_k", "_on")

    def __init__(self, causal: bool, members: list):
        """``members``: ``[(base block, start rows of the sequences it is moved to)]``."""
        self.causal, self.members = causal, members
        self.q_starts, self.q_lens, self.k_starts, self.k_lens = [], [], [], []
        for task, starts in members:
            n = len(starts)
            self.q_starts.extend(map(task.q_start.__add__, starts))
            self.k_starts.extend(map(task.k_start.__add__, starts))
            self.q_lens.extend([task.q_stop - task.q_start] * n)
            self.k_lens.extend([task.k_stop - task.k_start] * n)
        self.max_q, self.max_k = max(self.q_lens), max(self.k_lens)
        self._on = {}

    def __len__(self) -> int:
        return len(self.q_starts)

    @property
    def tasks(self) -> Tuple[BlockTask, ...]:
        """The calls this batch makes, one block each."""
        return tuple(task.shifted(s, s) for task, starts in self.members for s in starts)

    def spans(self):
        """``((q0, q1), (k0, k1))`` of each block in the packed query and key rows, block after block."""
        q_end = k_end = 0
        for q_len, k_len in zip(self.q_lens, self.k_lens):
            yield (q_end, q_end + q_len), (k_end, k_end + k_len)
            q_end, k_end = q_end + q_len, k_end + k_len

    def _made(self, device: torch.device):
        found = self._on.get(device)
        if found is None:
            n = len(self)
            made_of = torch.tensor([*self.q_starts, *self.k_starts, *self.q_lens, *self.k_lens],
                                   dtype=torch.int64).to(device)  # one copy to the device
            q_starts, k_starts, q_lens, k_lens = made_of.split([n] * 4)
            zero = made_of.new_zeros(1)
            found = self._on[device] = (
                (_ranges(q_starts, q_lens, sum(self.q_lens)), _ranges(k_starts, k_lens, sum(self.k_lens))),
                (torch.cat([zero, q_lens.cumsum(0)]).int(), torch.cat([zero, k_lens.cumsum(0)]).int()))
        return found

    def indices(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Row indices ``(query rows, key rows)``, block after block, on ``device`` (made once per device)."""
        return self._made(device)[0]

    def offsets(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cu_seqlens_q, cu_seqlens_k)`` (int32, on ``device``) of the packed blocks."""
        return self._made(device)[1]


def share_rows(calls) -> None:
    """Give the batches among ``calls`` (one ring step's, or the all-gather exchange's) their indices in one
    :class:`_StepRows`."""
    batches = [call for call in calls if isinstance(call, TaskBatch)]
    if batches:
        rows = _StepRows(batches)
        for slot, batch in enumerate(batches):
            batch._rows, batch._slot = rows, slot


Call = Union[BlockTask, TaskBatch, VarlenBatch]


# One batch's P sources, reused by its layers and its backward. Smaller than the plans' cache: a batch's
# calls hold their row indices on the device (up to 16 bytes x P x local tokens per batch), and training never
# returns to an earlier batch's layout. P > 64 still works, planning each step again.
@lru_cache(maxsize=64)
def step_calls(layout, rank: int, src: int, world_size: int, seqlen_local: int, band,
               keep_positions: bool = False, varlen: bool = False) -> Tuple[Call, ...]:
    """The kernel calls rank ``rank`` makes on the K/V of rank ``src``: :func:`~ring_flash_attn.ring.planner.
    plan_step`'s blocks, the small ones of one shape batched (a packed batch is batched as it is planned).
    ``varlen`` (a packed batch, for a backend that serves variable-length calls): the small unmasked blocks
    of a step, and its small causal squares, are each one :class:`VarlenBatch` whatever their lengths."""
    if isinstance(layout, PackedLayout):
        return _packed_calls(layout, rank, src, world_size, band, keep_positions, varlen)
    return batch_calls(plan_step(layout, rank, src, world_size, seqlen_local, band, keep_positions))


PLAN_CACHES.append(step_calls)


def _packed_calls(layout: PackedLayout, rank: int, src: int, world_size: int, band, keep_positions: bool,
                  varlen: bool = False):
    """A packed step's calls, batched from the per-length plans without placing each sequence's blocks first.

    Each sequence's blocks are its base layout's for its length, moved to where the sequence starts
    (planner._plan_packed); so one base block over all sequences of a length is one batch, and base blocks of
    the same shape from other lengths join it (other sequences: other rows). Two base blocks of one length
    whose query rows or key rows overlap (one sequence's rows) go to different batches. Blocks of a shape
    that has fewer than MIN_BATCHED_CALLS in all are made one by one.
    """
    plans, shapes = _step_plans(layout.base, rank, src, world_size, band, keep_positions)
    by_shape = {}  # shape number -> [blocks over all sequences, [(length, base block, starts)]]
    for length, starts in _starts_by_length(layout).items():
        plan = plans.get(length)
        if plan is None:
            plan = plans[length] = _numbered_shapes(
                _base_plan(layout.base, rank, src, world_size, length, band, keep_positions), shapes)
        for shape, task in plan:
            entry = by_shape.get(shape)
            if entry is None:
                by_shape[shape] = [len(starts), [(length, task, starts)]]
            else:
                entry[0] += len(starts)
                entry[1].append((length, task, starts))
    calls = []
    make = tuple.__new__  # BlockTask(...) without the named tuple's argument handling
    shape_of = list(shapes)
    if varlen:  # the shapes a variable-length call serves leave by_shape for one call per kind
        by_shape = _varlen_calls(by_shape, shape_of, calls)
    for shape, (count, members) in by_shape.items():
        q_len, k_len, task_band, positions = shape_of[shape]
        if count < MIN_BATCHED_CALLS or q_len > MAX_BATCHED_ROWS:
            for _, (q_start, q_stop, k_start, k_stop, _, _), starts in members:
                calls.extend([make(BlockTask, (q_start + s, q_stop + s, k_start + s, k_stop + s, task_band, positions))
                              for s in starts])
            continue
        batches = []  # [(q_starts, k_starts)]
        blocks_by_length = {}  # length -> per batch, the base blocks it holds
        for length, task, starts in members:
            n = _free_call(blocks_by_length, length, task)
            if n == len(batches):
                batches.append(([], []))
            batches[n][0].extend(map(task.q_start.__add__, starts))
            batches[n][1].extend(map(task.k_start.__add__, starts))
        for q_starts, k_starts in batches:
            if len(q_starts) >= MIN_BATCHED_CALLS:
                calls.extend(TaskBatch(q_len, k_len, task_band, positions, q_starts[i:i + MAX_CALLS_PER_BATCH],
                                       k_starts[i:i + MAX_CALLS_PER_BATCH])
                             for i in range(0, len(q_starts), MAX_CALLS_PER_BATCH))
            else:
                calls.extend(make(BlockTask, (q, q + q_len, k, k + k_len, task_band, positions))
                             for q, k in zip(q_starts, k_starts))
    share_rows(calls)
    return tuple(calls)


def _varlen_calls(by_shape: dict, shape_of: list, calls: list) -> dict:
    """Append to ``calls`` the VarlenBatches of a packed step's small unmasked blocks and small causal squares
    (of any lengths); return the shapes left for batches of one shape. Blocks of one sequence that share
    query rows or key rows go to different calls, as in :func:`_packed_calls`: each row is written or added
    once per call, so the result does not depend on the order a GPU's atomics take."""
    left, pools = {}, {False: [], True: []}  # causal -> per call, [(base block, starts)]
    for shape, entry in by_shape.items():
        q_len, k_len, task_band, _ = shape_of[shape]
        if q_len > MAX_BATCHED_ROWS:
            left[shape] = entry
        elif task_band is None:
            pools[False].append(entry[1])
        elif task_band.is_top_left_causal(q_len, k_len):
            pools[True].append(entry[1])
        else:
            left[shape] = entry
    for causal, entries in pools.items():
        slots, used_by_length = [], {}  # per call: [(block, starts)]; length -> per call, its blocks there
        for members in entries:
            for length, task, starts in members:
                n = _free_call(used_by_length, length, task)
                if n == len(slots):
                    slots.append([])
                slots[n].append((task, starts))
        for members in slots:
            if sum(len(starts) for _, starts in members) >= MIN_BATCHED_CALLS:
                calls.append(VarlenBatch(causal, members))
            else:
                calls.extend(task.shifted(s, s) for task, starts in members for s in starts)
    return left


@lru_cache(maxsize=64)
def _starts_by_length(layout: PackedLayout) -> dict:
    """The local start rows of a packed batch's sequences by local length (empty sequences left out): the
    same for every ring step of the batch, so found once per batch, not once per step."""
    starts_by_length, local_start = {}, 0
    for length in layout.seqlens_local:
        if length:
            starts = starts_by_length.get(length)
            if starts is None:
                starts_by_length[length] = [local_start]
            else:
                starts.append(local_start)
        local_start += length
    return starts_by_length


@lru_cache(maxsize=1024)
def _step_plans(base, rank: int, src: int, world_size: int, band, keep_positions: bool):
    """For one ring step of the base layout: ``(length -> ((shape number, base block), ...), shape -> number)``,
    both filled as lengths come (by :func:`_packed_calls`, across batches). Grouping blocks by a number instead
    of by their (rows, band, positions) key spares hashing a band per block per step: a third of the time."""
    return {}, {}


def _numbered_shapes(tasks, shapes: dict) -> tuple:
    numbered = []
    for task in tasks:
        key = (task.q_stop - task.q_start, task.k_stop - task.k_start, task.band, task.positions)
        numbered.append((shapes.setdefault(key, len(shapes)), task))
    return tuple(numbered)


PLAN_CACHES.extend([_starts_by_length, _step_plans])


def _free_call(blocks_by_length: dict, length: int, task: BlockTask) -> int:
    """The first of the calls being made (``blocks_by_length[length][n]``: the base blocks of sequences of that
    length in call n) where base block ``task`` shares no row with another block of its sequences; it is
    added there. Only blocks of one length can clash: other sequences are other rows."""
    used = blocks_by_length.setdefault(length, [])
    n = 0
    while n < len(used) and any(_overlap(task, other) for other in used[n]):
        n += 1
    if n == len(used):
        used.append([])
    used[n].append(task)
    return n


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
                calls.extend(TaskBatch.of(batch_tasks[i:i + MAX_CALLS_PER_BATCH])
                             for i in range(0, len(batch_tasks), MAX_CALLS_PER_BATCH))
                batched = True
    if not batched:
        return tasks  # nothing to batch: the planner's calls in the planner's order
    share_rows(calls)
    return tuple(calls)


def keys_moved(calls, k_by: int) -> Tuple[Call, ...]:
    """``calls`` (one ring step's, from :func:`step_calls`) on key rows moved by ``k_by``: the all-gather
    exchange's calls on source rank ``src``'s keys, which sit at ``src * seqlen_local`` in the gathered K/V."""
    moved = []
    for call in calls:
        if isinstance(call, TaskBatch):
            moved.append(TaskBatch(call.q_len, call.k_len, call.band, call.positions, call.q_starts,
                                   [k + k_by for k in call.k_starts]))
        elif isinstance(call, VarlenBatch):
            moved.append(VarlenBatch(call.causal, [(task.shifted(0, k_by), starts) for task, starts in call.members]))
        else:
            moved.append(call.shifted(0, k_by))
    return tuple(moved)


def varlen_calls(tasks: Tuple[BlockTask, ...]) -> Tuple[Call, ...]:
    """``tasks`` (any blocks, in query order, key rows rising with the query rows: one per packed sequence and
    kind, as the llama3 exchange plans them) with the small unmasked blocks, and the small causal squares, made
    :class:`VarlenBatch` calls of a backend's variable-length kernel; the rest as :func:`batch_calls` makes them.
    A block joins the first call of its kind whose last block ends, in query rows and in key rows, before it
    starts (so rows stay disjoint within a call)."""
    kinds = {False: [], True: []}  # causal -> per call [blocks, end of its query rows, end of its key rows]
    rest = []
    for task in tasks:
        q_len, k_len = task.q_stop - task.q_start, task.k_stop - task.k_start
        causal = task.band is not None
        if q_len > MAX_BATCHED_ROWS or (causal and not task.band.is_top_left_causal(q_len, k_len)):
            rest.append(task)
            continue
        for call in kinds[causal]:
            if call[1] <= task.q_start and call[2] <= task.k_start:
                break
        else:
            call = [[], 0, 0]
            kinds[causal].append(call)
        call[0].append(task)
        call[1], call[2] = task.q_stop, task.k_stop
    calls = []
    for causal, made in kinds.items():
        for blocks, _, _ in made:
            if len(blocks) < MIN_BATCHED_CALLS:
                rest.extend(blocks)
            else:
                calls.extend(VarlenBatch(causal, [(task, [0]) for task in blocks[i:i + MAX_CALLS_PER_BATCH]])
                             for i in range(0, len(blocks), MAX_CALLS_PER_BATCH))
    rest.sort(key=lambda task: (task.q_start, task.k_start))
    return (*calls, *batch_calls(tuple(rest)))


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
