"""One call at a time on a process group.

Transfers on a process group are matched by their order on each rank. Two threads of one process that call
attention on the same group at once interleave their transfers, and the ranks may pair them differently: each
call computes on the other's blocks, without an error. So a call that communicates marks its groups for its
duration (the forward and, separately, the backward, on whichever thread autograd runs it). A second call that
enters a marked group from another thread raises :class:`GroupBusyError` on its thread at once, before any
transfer; the call in flight then fails too, on every rank, at its check after the last exchange
(:func:`ring_flash_attn.agreement.finish`): on another rank the two calls may have been paired the other way.
Calls on different groups may overlap: give each thread its own group (``dist.new_group`` over the same ranks).

A call that enters during the last check of the call in flight is refused, but that call is not failed any
more (its check has run): such a race is as narrow as the check.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from ..validation import is_process_group


class GroupBusyError(RuntimeError):
    """A call entered a process group on which another thread's call was in flight."""


@dataclass
class _Call:
    thread: threading.Thread
    what: str
    depth: int = 1  # public functions call each other: the same thread enters again
    intruder: Optional[str] = None  # what entered from another thread while this call was in flight


_lock = threading.Lock()
_calls: dict = {}  # process group -> the call in flight on it


def _communicating(group) -> bool:
    """Whether a call on ``group`` (None: the default group) exchanges anything: this rank is in it with others."""
    return dist.is_available() and dist.is_initialized() and is_process_group(group) \
        and dist.get_rank(group) >= 0 and dist.get_world_size(group) > 1


def _key(group):
    return dist.group.WORLD if group is None else group


def _describe(group) -> str:
    return f"the process group of ranks {dist.get_process_group_ranks(_key(group))}"


@contextlib.contextmanager
def one_call_at_a_time(groups, what: str):
    """Mark ``groups`` (process groups; None is the default group) as carrying ``what`` on this thread for the
    duration; raise :class:`GroupBusyError` if another thread's call is in flight on one of them."""
    keys = list(dict.fromkeys(_key(g) for g in groups if _communicating(g)))
    me = threading.current_thread()
    with _lock:
        for key in keys:
            call = _calls.get(key)
            if call is not None and call.thread is not me:
                call.intruder = f"{what} from thread {me.name!r}"
                raise GroupBusyError(
                    f"group: {call.what} from thread {call.thread.name!r} is in flight on {_describe(key)}, and "
                    f"{what} from thread {me.name!r} entered it too. Calls on one process group must not overlap "
                    "(their transfers would interleave): both calls fail. Give each thread its own group "
                    "(torch.distributed.new_group over the same ranks), or run the calls one after the other")
        for key in keys:
            if key in _calls:
                _calls[key].depth += 1
            else:
                _calls[key] = _Call(me, what)
    try:
        yield
    finally:
        with _lock:
            for key in keys:
                call = _calls[key]
                call.depth -= 1
                if call.depth == 0:
                    del _calls[key]


def intruder(group) -> Optional[GroupBusyError]:
    """The error of this thread's call in flight on ``group`` if a call from another thread entered it meanwhile,
    else None."""
    if not _communicating(group):
        return None
    key = _key(group)
    with _lock:
        call = _calls.get(key)
        if call is None or call.thread is not threading.current_thread() or call.intruder is None:
            return None
        return GroupBusyError(f"group: {call.intruder} entered {_describe(key)} while {call.what} was in flight "
                              "there, so this call's transfers may have been paired with that call's on some rank. "
                              "Calls on one process group must not overlap: give each thread its own group")
