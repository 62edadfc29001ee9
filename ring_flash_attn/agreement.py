"""Ranks agree before they exchange, and fail together after.

Two checks surround every call that communicates (ring or all-gather exchange):

* **Before the first exchange** (:func:`agree`): each rank offers a fingerprint of
  what every rank must share (shapes, dtypes, device type, causal, scale, window,
  softcap, layout and ``cu_seqlens``, exchange, ...) and whether its own argument
  validation passed. That is one all-gather of three integers per rank; only when
  something differs does a second round gather the full descriptions, so that every
  rank raises the same error naming the argument and each rank's value. Without it a
  size mismatch aborts the process inside gloo and equal sizes compute on garbage.
* **After the last exchange** (:func:`finish`): a rank whose kernel raised keeps
  passing K/V and dK/dV to the end of the ring (every transfer stays matched, so the
  group serves the next call); one small all-gather then tells every rank who failed
  and why, and every rank raises.

``RING_FLASH_ATTN_AGREE`` chooses how often ranks agree before exchanging:

* ``once`` (default): when this rank's call differs from the last call agreed on the
  group. Safe against silent corruption: ranks that skip the check all hold the
  signature the whole group last agreed on, so they agree with each other. But a rank
  whose arguments changed (or failed validation) while the others' did not waits in
  the check while they exchange; the bounded wait below turns that into an error on
  every rank (the group is then unusable). ``always`` names the argument instead.
* ``always``: every call (one small collective per call).
* ``never``: no checks at all, neither before nor after; errors raise on their rank
  only, as without this module.

``RING_FLASH_ATTN_WAIT_TIMEOUT_S`` (default 60) bounds each wait in these checks and,
on CPU (gloo, where waiting blocks anyway), each exchange wait. On GPUs exchanges stay
ordered on streams, and a rank that never arrives is left to the process-group timeout.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import itertools
import json
import os
import threading
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

MODE_ENV = "RING_FLASH_ATTN_AGREE"
TIMEOUT_ENV = "RING_FLASH_ATTN_WAIT_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60.0
MODES = ("once", "always", "never")


class RanksDisagreeError(ValueError):
    """The ranks of a group passed arguments that every rank must share, with different values."""


class PeerRankError(RuntimeError):
    """Another rank of the group failed (its validation or its kernel); this rank raises with it."""


class RankWaitTimeout(RuntimeError):
    """Not every rank of the group took part in a transfer within the bounded wait."""


def mode() -> str:
    value = os.environ.get(MODE_ENV, "once") or "once"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}: expected one of {MODES}, got {value!r}")
    return value


def wait_timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = DEFAULT_TIMEOUT_S if raw in (None, "") else float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}: expected a number of seconds, got {raw!r}") from None
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV}: expected a number of seconds > 0, got {raw!r}")
    return timedelta(seconds=seconds)


def wait_bounded(works, what: str) -> None:
    """Wait for every ``work`` at most :func:`wait_timeout` each; a timeout names what was waited for."""
    timeout = wait_timeout()
    for work in works:
        try:
            work.wait(timeout=timeout)
        except RuntimeError as error:
            if "timed out" not in str(error).lower():
                raise
            raise RankWaitTimeout(
                f"{what}: not every rank of the group took part within {timeout.total_seconds():g} s ({TIMEOUT_ENV}). "
                "A rank skipped this call, failed outside the ring, or (with "
                f"{MODE_ENV}=once) changed its arguments while the others did not; the group is unusable now"
            ) from error


# Per thread: how deep we are in public calls, and whether the current outermost call reached `agree`.
_call = threading.local()
# Per (process group, kind of call): the description the whole group last agreed on (RING_FLASH_ATTN_AGREE=once).
_last_agreed: dict = {}
# Per device-only process group: the gloo group over the same ranks that carries these checks.
_control_groups: dict = {}


def _call_state():
    if not hasattr(_call, "depth"):
        _call.depth, _call.reached = 0, False
    return _call


@contextlib.contextmanager
def errors_shared(group, active: bool = True):
    """Around a public entry point: an error raised on this rank before :func:`agree` (its argument validation)
    is offered to the agreement, so the ranks that passed validation raise too instead of waiting.

    Only the outermost entry point acts (public functions call each other). ``active=False`` (a stand-in
    communicator such as the loopback) leaves errors alone.
    """
    state = _call_state()
    outermost = state.depth == 0
    if outermost:
        state.reached = False
    state.depth += 1
    try:
        yield
    except Exception as error:
        if outermost and active and not state.reached and _takes_part(group):
            _agree(group, None, error, None, "attention")
        raise
    finally:
        state.depth -= 1


def shares_errors(fn):
    """Decorate a public entry point whose ``group`` (and, if it has one, ``comm``) argument names the group:
    its errors before :func:`agree` are shared as :func:`errors_shared` describes. ``comm`` given: not shared."""
    parameters = inspect.signature(fn).parameters
    names = list(parameters)

    def argument(name, args, kwargs):
        if name not in parameters:
            return None
        if name in kwargs:
            return kwargs[name]
        index = names.index(name)
        return args[index] if index < len(args) else parameters[name].default

    @functools.wraps(fn)
    def shared(*args, **kwargs):
        with errors_shared(argument("group", args, kwargs), active=argument("comm", args, kwargs) is None):
            return fn(*args, **kwargs)

    return shared


def _takes_part(group) -> bool:
    """Whether this rank checks with the others of ``group``: not when the checks are off, when it is not a
    member, or when it is the group's only rank (nobody to disagree with or to tell; its errors raise here,
    and a one-rank run such as the trainer at cp = 1 pays no collective per attention call)."""
    return (mode() != "never" and dist.is_available() and dist.is_initialized() and dist.get_rank(group) >= 0
            and dist.get_world_size(group) > 1)


def describe(q, k, v, **shared) -> tuple:
    """What every rank must share about one call: ``(name, value)`` pairs, values with a stable ``repr``."""
    items = [("q shape", tuple(q.shape)), ("k shape", tuple(k.shape)), ("v shape", tuple(v.shape)),
             ("dtype", q.dtype), ("device type", q.device.type),
             # A rank that records no graph would skip the backward while the others wait in its exchanges.
             ("requires_grad", torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))]
    items += [(name, value) for name, value in shared.items()]
    return tuple(items)


def layout_items(layout) -> dict:
    """A layout as :func:`describe` keywords: its variant name and, for packed sequences, the local cu_seqlens."""
    seqlens = getattr(layout, "seqlens_local", None)
    return {"variant": layout.name,
            "cu_seqlens": None if seqlens is None else tuple(itertools.accumulate(seqlens, initial=0))}


def agree(group, items: tuple, device: torch.device, kind: str = "attention") -> None:
    """Before the first exchange of a call: every rank of ``group`` holds the same ``items``, or all raise.

    ``kind`` keeps the once-mode memory of different calls apart (attention, gathering a sequence), so that
    alternating between them does not make every call a new one."""
    _call_state().reached = True
    if not _takes_part(group):
        return
    _agree(group, items, None, device, kind)


def _group_key(group):
    return dist.group.WORLD if group is None else group


def _control_channel(group, device: Optional[torch.device]):
    """``(group, device)`` for these host-side checks, so that they never synchronise the host with a device.

    A group with a CPU (gloo) backend runs them on CPU tensors itself. A device-only group (NCCL, XCCL) would
    need device tensors whose values the host then reads: a host-device synchronisation at every call, which
    stalls the GPU queue layer after layer. For it the checks run on a gloo group over the same ranks, made at
    the group's first agreement (which every rank of the group reaches: the first call is always checked)
    and kept for the process; where gloo is not available they fall back to the group itself.
    """
    backend = str(dist.get_backend(group))
    if "gloo" in backend or device is None or device.type == "cpu":
        return group, torch.device("cpu")
    key = _group_key(group)
    if key not in _control_groups:
        try:
            _control_groups[key] = dist.new_group(dist.get_process_group_ranks(key), backend="gloo",
                                                  use_local_synchronization=True)
        except (RuntimeError, ValueError):  # no gloo in this build of torch
            _control_groups[key] = None
    control = _control_groups[key]
    return (group, device) if control is None else (control, torch.device("cpu"))


def _gather_ints(values, group, device, what: str):
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    wait_bounded([dist.all_gather(gathered, mine, group=group, async_op=True)], what)
    return [g.tolist() for g in gathered]


def _gather_texts(text: str, lengths, group, device, what: str):
    """Every rank's ``text`` (its UTF-8 length already gathered in ``lengths``)."""
    data = text.encode()
    mine = torch.tensor(list(data.ljust(max(lengths), b"\0")), dtype=torch.uint8, device=device)
    gathered = [torch.empty_like(mine) for _ in lengths]
    wait_bounded([dist.all_gather(gathered, mine, group=group, async_op=True)], what)
    return [bytes(g[:n].cpu().tolist()).decode() for g, n in zip(gathered, lengths)]


def _fingerprint(description: str) -> int:
    return int.from_bytes(hashlib.blake2b(description.encode(), digest_size=8).digest(), "little", signed=True)


def _agree(group, items: Optional[tuple], error: Optional[BaseException], device, kind: str) -> None:
    """One agreement round. ``items`` None: this rank's validation raised ``error`` (re-raised here)."""
    key = (_group_key(group), kind)
    if error is None:
        if mode() == "once" and _last_agreed.get(key) == items:
            return
        description = json.dumps([[name, repr(value)] for name, value in items])
        fingerprint = _fingerprint(description)
    else:
        description, fingerprint = json.dumps(f"{type(error).__name__}: {error}"), 0
    group, device = _control_channel(group, device)
    what = "argument agreement before the first exchange"
    try:
        status = _gather_ints([int(error is not None), fingerprint, len(description.encode())], group, device, what)
    except Exception as sharing_failed:  # a timeout, or a group already broken: this rank's own error comes first
        if error is not None:
            error.add_note(f"(this rank's error could not be shared with the group: {sharing_failed})")
            raise error
        raise
    failed = [r for r, (bad, _, _) in enumerate(status) if bad]
    if not failed and len({fp for _, fp, _ in status}) == 1:
        _last_agreed[key] = items
        return
    texts = [json.loads(t) for t in _gather_texts(description, [n for _, _, n in status], group, device, what)]
    if failed:
        if error is not None:
            if len(failed) > 1:
                error.add_note("ranks that rejected their arguments: " + ", ".join(map(str, failed)))
            raise error
        raise PeerRankError("; ".join(f"rank {r} rejected its arguments: {texts[r]}" for r in failed))
    per_rank = [dict(t) for t in texts]
    differing = [name for name, _ in texts[0] if len({d.get(name) for d in per_rank}) > 1]
    differing += sorted({name for d in per_rank for name in d} - set(dict(texts[0])))
    raise RanksDisagreeError("; ".join(
        f"{name}: expected the same value on every rank of the group, got "
        + ", ".join(f"rank {r}: {d.get(name, 'absent')}" for r, d in enumerate(per_rank))
        for name in differing))


class ComputeFailure:
    """The first error this rank's compute raised during one call, and where (for the other ranks' message)."""

    def __init__(self, error: BaseException, where: str):
        self.error, self.where = error, where


def finish(group, failure: Optional[ComputeFailure], device: torch.device, what: str) -> None:
    """After the last exchange of ``what`` (e.g. "ring forward"): if any rank's compute failed, every rank raises.

    The failing rank raises its own error; the others a :class:`PeerRankError` naming it and why.
    """
    if not _takes_part(group):
        if failure is not None:
            raise failure.error
        return
    group, device = _control_channel(group, device)
    message = "" if failure is None else f"{failure.where}: {type(failure.error).__name__}: {failure.error}"
    status = _gather_ints([int(failure is not None), len(message.encode())], group, device,
                          f"{what}: failure check after the last exchange")
    failed = [r for r, (bad, _) in enumerate(status) if bad]
    if not failed:
        return
    texts = _gather_texts(message, [n for _, n in status], group, device, f"{what}: failure report")
    if failure is not None:
        if len(failed) > 1:
            failure.error.add_note(f"{what}: ranks that failed: " + ", ".join(map(str, failed)))
        raise failure.error
    raise PeerRankError(f"{what}: " + "; ".join(f"rank {r} failed at {texts[r]}" for r in failed))
