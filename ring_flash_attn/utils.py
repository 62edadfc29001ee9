"""zhuzilin/ring-flash-attention's ``ring_flash_attn.utils``: the pieces its users build their own attention loops
from, as thin adapters over this package's communicators and merge.

* :class:`RingComm`: queue sends to ``rank + 1`` / receives from ``rank - 1`` (``send_recv``, ``send_recv_kv``),
  start them (``commit``), ``wait``; over :class:`ring_flash_attn.comm.ring.RingComm`.
* :func:`update_out_and_lse`: fold one block's (out, LSE) into the running ones; over
  :func:`ring_flash_attn.merge.merge_into`.
* :class:`AllGatherComm`: asynchronous all-gathers, then ``wait``; over :mod:`ring_flash_attn.comm.collectives`.
* :func:`get_default_args`: a function's positional parameters and their defaults, for calling flash-attn's
  internal functions by keyword across its versions.
* :func:`flatten_varlen_lse` / :func:`unflatten_varlen_lse`: see :mod:`ring_flash_attn.triton_utils`.

On CPU every wait is bounded as in the rest of the package: a rank that never arrives is an error within
seconds (RING_FLASH_ATTN_WAIT_TIMEOUT), not a hang.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .comm import ring
from .comm.collectives import start_all_gather, wait_works
from .merge import accumulator_dtype, merge_into
from .triton_utils import flatten_varlen_lse, unflatten_varlen_lse

__all__ = ["update_out_and_lse", "RingComm", "AllGatherComm", "get_default_args", "flatten_varlen_lse",
           "unflatten_varlen_lse"]


def get_default_args(func) -> dict:
    """``{name: default}`` for each positional parameter of ``func`` (None where it has no default), with
    ``softcap`` set to 0.0 where present; the same (cached) dict for the same function: ``.copy()`` it before
    changing it. A ``torch.library`` custom op is read through the Python function it was defined from."""
    if not inspect.isfunction(func) and hasattr(func, "_init_fn"):  # torch.library.CustomOpDef
        func = func._init_fn
    return _default_args(func)


@functools.lru_cache(maxsize=None)
def _default_args(func) -> dict:
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    args = {p.name: None if p.default is inspect.Parameter.empty else p.default
            for p in inspect.signature(func).parameters.values() if p.kind in positional}
    if "softcap" in args:
        args["softcap"] = 0.0
    return args


def _lse_rows_last(lse_acc: torch.Tensor) -> torch.Tensor:
    """The accumulator LSE ``[..., seqlen, heads, 1]`` seen as the merge's ``[batch, heads, seqlen]`` (a view)."""
    view = lse_acc.squeeze(-1).transpose(-2, -1)
    return view.unsqueeze(0) if view.dim() == 2 else view


def _batched(x: torch.Tensor, dims: int) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == dims - 1 else x


def update_out_and_lse(out: Optional[torch.Tensor], lse: Optional[torch.Tensor], block_out: torch.Tensor,
                       block_lse: torch.Tensor, slice_=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold one block's attention result into the running one; returns the running ``(out, lse)``.

    Layouts as in zhuzilin/ring-flash-attention: ``block_out`` ``[batch, seqlen, heads, head_dim]`` (or varlen
    ``[tokens, heads, head_dim]``) and ``block_lse`` ``[batch, heads, seqlen]`` (``[heads, tokens]``), as
    flash-attn returns them; the running ``out`` has ``block_out``'s shape and the running ``lse`` is
    ``[batch, seqlen, heads, 1]`` (``[tokens, heads, 1]``): turn it back with ``lse.squeeze(-1).transpose(-2, -1)``.

    The first call passes ``out=None, lse=None`` and starts fresh accumulators (float32; float64 for float64
    blocks). Later calls update them in place and return them; ``slice_`` (an index into the running tensors,
    e.g. ``(slice(None), slice(half, None))``) folds a block that covers only those rows. A row that has seen
    no key has LSE -inf and output 0, never NaN.
    """
    if out is None:
        if slice_ is not None:
            raise RuntimeError("slice_: the first update_out_and_lse call (out=None) starts the accumulators for "
                               "every row; pass slice_ only in later calls")
        dtype = accumulator_dtype(block_out.dtype)
        return block_out.to(dtype, copy=True), block_lse.to(dtype, copy=True).transpose(-2, -1).unsqueeze(-1)
    if lse is None:
        raise ValueError("lse: expected the running LSE returned with out by the previous call, got None")
    out_rows, lse_rows = (out, lse) if slice_ is None else (out[slice_], lse[slice_])
    want_lse = (*block_lse.shape[:-2], block_lse.shape[-1], block_lse.shape[-2], 1)
    if block_out.shape != out_rows.shape or tuple(lse_rows.shape) != want_lse or block_out.dim() not in (3, 4):
        raise ValueError(f"block_out/block_lse: expected [batch, seqlen, heads, head_dim] (or [tokens, heads, "
                         f"head_dim]) and [batch, heads, seqlen] (or [heads, tokens]) matching the running out "
                         f"{tuple(out_rows.shape)} and lse {tuple(lse_rows.shape)}, got {tuple(block_out.shape)} "
                         f"and {tuple(block_lse.shape)}")
    merge_into(_batched(out_rows, 4), _lse_rows_last(lse_rows), _batched(block_out, 4), _batched(block_lse, 3))
    if slice_ is not None and out_rows.data_ptr() != out[slice_].data_ptr():  # an index that copies, not views
        out[slice_], lse[slice_] = out_rows, lse_rows
    return out, lse


class RingComm:
    """Send to the next rank and receive from the previous one in ``process_group`` (None: the default group).

    ``send_recv(to_send, recv_tensor=None)`` queues one transfer and returns the tensor that will receive the
    previous rank's (``recv_tensor``, or a new one); ``commit()`` starts every queued transfer; ``wait()``
    returns once they are done (touch the received tensors, or change the sent ones, only after it).
    ``send_recv_kv(k, v, k_buffer=None, v_buffer=None)`` queues K and V and commits. ``rank``/``world_size``
    are the group's; ``send_rank``/``recv_rank`` the global ranks of the neighbours.
    """

    def __init__(self, process_group: Optional[dist.ProcessGroup]):
        self._ring = ring.RingComm(process_group)
        self._process_group = process_group
        self.rank, self.world_size = self._ring.rank, self._ring.world_size
        self.send_rank, self.recv_rank = self._ring.send_peer, self._ring.recv_peer
        self._ops = []  # queued (send, receive) pairs
        self._reqs = None  # exchanges in flight after commit()

    def send_recv(self, to_send: torch.Tensor, recv_tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not to_send.is_contiguous():
            raise ValueError(f"to_send: expected a contiguous tensor, got strides {to_send.stride()} for shape "
                             f"{tuple(to_send.shape)}")
        if recv_tensor is None:
            recv_tensor = torch.empty_like(to_send)
        elif (recv_tensor.shape, recv_tensor.dtype) != (to_send.shape, to_send.dtype) or not recv_tensor.is_contiguous():
            raise ValueError(f"recv_tensor: expected a contiguous tensor of to_send's shape {tuple(to_send.shape)} and "
                             f"dtype {to_send.dtype}, got {tuple(recv_tensor.shape)} {recv_tensor.dtype}")
        self._ops.append((to_send, recv_tensor))
        return recv_tensor

    def commit(self) -> None:
        if self._reqs is not None:
            raise RuntimeError("commit called twice: wait() for the transfers in flight first")
        self._reqs = [self._ring.exchange(send, recv) for send, recv in self._ops]

    def wait(self) -> None:
        if self._reqs is None:
            raise RuntimeError("wait called before commit")
        for pending in self._reqs:
            pending.wait()
        self._reqs, self._ops = None, []

    def send_recv_kv(self, k: torch.Tensor, v: torch.Tensor, k_buffer: Optional[torch.Tensor] = None,
                     v_buffer: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        next_k, next_v = self.send_recv(k, k_buffer), self.send_recv(v, v_buffer)
        self.commit()
        return next_k, next_v


class AllGatherComm:
    """Asynchronous all-gathers in ``group`` (None: the default group): ``all_gather(output_tensor,
    input_tensor)`` starts gathering every rank's ``input_tensor`` into ``output_tensor`` (concatenated along
    dim 0, rank order); ``wait()`` returns once every gather started since the last wait is done."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group
        self.handles = []
        self._tensors = []  # held until wait(): the backend may still read and write them

    def all_gather(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor) -> None:
        world_size = dist.get_world_size(self.group)
        if output_tensor.numel() != world_size * input_tensor.numel() or output_tensor.dtype != input_tensor.dtype:
            raise ValueError(f"output_tensor: expected {world_size} x input_tensor's {input_tensor.numel()} elements of "
                             f"{input_tensor.dtype}, got {output_tensor.numel()} of {output_tensor.dtype}")
        self.handles.append(start_all_gather(output_tensor, input_tensor, self.group))
        self._tensors.append((output_tensor, input_tensor))

    def wait(self) -> None:
        if self.handles:
            wait_works(self.handles, self._tensors[0][0].device, "AllGatherComm all-gather")
        self.handles, self._tensors = [], []
