"""Ranks agree before they exchange, and fail together after.

Two checks surround every call that communicates (ring or all-gather exchange):

* **Before the first exchange** (:func:`agree`): each rank offers a fingerprint of
  what every rank must share (shapes, dtypes, device type, causal, scale, window,
  softcap, layout and ``cu_seqlens``, exchange, ...) and whether its own argument
  validation passed. That is one all-gather of four integers per rank; only when
  something differs does a second round gather the full descriptions, so that every
  rank raises the same error naming the argument and each rank's value. Without it a
  size mismatch aborts the process inside gloo and equal sizes compute on garbage.
* **After the last exchange** (:func:`finish`): a rank whose kernel raised keeps
  passing K/V and dK/dV to the end of the ring (every transfer stays matched, so the
  group serves the next call); one small all-gather then tells every rank who failed
  and why, and every rank raises.

The checks never meet a data transfer (:func:`_control_channel`): on a gloo group they are tagged
sends and receives, on a device-only group all-gathers on a gloo group of their own.

``RING_FLASH_ATTN_AGREE`` chooses how often ranks agree before exchanging:

* ``once`` (default): when this rank's call differs from the last call agreed on the
  group. Safe against silent corruption: ranks that skip the check all hold the
  signature the whole group last agreed on, so they agree with each other. But a rank
  whose arguments changed (or failed validation) while the others' did not checks while
  they exchange. Where exchanges do not block the host (NCCL, XCCL) the others reach
  their check after the last exchange, the two checks meet (they have the same shape)
  and every rank raises the same error naming that rank and what changed; where they
  block (gloo) the bounded wait below turns it into an error on every rank. Either way
  the group is unusable afterwards (the others' exchanges were never matched).
  ``always`` names the argument before any exchange instead.
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
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from .comm import in_flight
from .validation import is_process_group

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
            if _peer_gone(error):
                raise RankWaitTimeout(
                    f"{what}: a rank of the group closed its connection before taking part (it exited or crashed, "
                    "skipped this call and left, or its own wait ran out first); the group is unusable now"
                ) from error
            if "timed out" not in str(error).lower():
                raise
            raise RankWaitTimeout(
                f"{what}: not every rank of the group took part within {timeout.total_seconds():g} s ({TIMEOUT_ENV}). "
                "A rank skipped this call, failed outside the ring, or (with "
                f"{MODE_ENV}=once) changed its arguments while the others did not; the group is unusable now"
            ) from error


def _peer_gone(error: RuntimeError) -> bool:
    """gloo's words for a peer whose process closed its end of the connection."""
    text = str(error).lower()
    return "connection closed by peer" in text or "connection reset by peer" in text


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
def errors_shared(*groups, active: bool = True):
    """Around a public entry point: an error raised on this rank before :func:`agree` (its argument validation)
    is offered to the agreement of each of ``groups`` in turn (as :func:`agree_all` runs them), so the ranks that
    passed validation raise too instead of waiting.

    Only the outermost entry point acts (public functions call each other). ``active=False`` (a stand-in
    communicator such as the loopback) leaves errors alone.
    """
    state = _call_state()
    outermost = state.depth == 0
    # Another thread's call in flight on one of the groups raises here, on this rank alone: telling the others
    # would need the group, which that call is using (see comm/in_flight.py).
    with in_flight.one_call_at_a_time(groups, "an attention call") if outermost and active \
            else contextlib.nullcontext():
        if outermost:
            state.reached = False
        state.depth += 1
        try:
            yield
        except Exception as error:
            if outermost and active and not state.reached:
                _agree_rounds(groups, None, error, None, "attention")  # raises this rank's error, the others told
            raise
        finally:
            state.depth -= 1


def shares_errors(fn=None, *, groups=None):
    """Decorate a public entry point whose ``group`` (and, if it has one, ``comm``) argument names the group:
    its errors before :func:`agree` are shared as :func:`errors_shared` describes. ``comm`` given: not shared.
    ``groups``: for an entry point over several groups, a function of ``argument(name)`` (the call's value of
    parameter ``name``) giving them in the order :func:`agree_all` agrees on them."""
    if fn is None:
        return functools.partial(shares_errors, groups=groups)
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
        value = functools.partial(argument, args=args, kwargs=kwargs)
        with errors_shared(*((value("group"),) if groups is None else groups(value)), active=value("comm") is None):
            return fn(*args, **kwargs)

    return shared


def _takes_part(group) -> bool:
    """Whether this rank checks with the others of ``group``: not when the checks are off, when it is not a
    member, or when it is the group's only rank (nobody to disagree with or to tell; its errors raise here,
    and a one-rank run such as the trainer at cp = 1 pays no collective per attention call)."""
    return (mode() != "never" and dist.is_available() and dist.is_initialized() and is_process_group(group)
            and dist.get_rank(group) >= 0 and dist.get_world_size(group) > 1)


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


def agree_all(groups, items: tuple, device: torch.device, kind: str) -> None:
    """:func:`agree` over several groups in turn, such as a mesh's rows, its columns, then its rows again. A rank
    that raised in one round offers its error to the later rounds, so when any round finds a problem every rank
    of the mesh raises: the columns hear what a row found (every column meets every row), the second row round
    what a column found."""
    _call_state().reached = True
    _agree_rounds(groups, items, None, device, kind)


def _agree_rounds(groups, items: Optional[tuple], error: Optional[BaseException], device, kind: str) -> None:
    """One agreement round on each of ``groups`` in turn; ``error`` (this rank's validation error, or the first a
    round raised) is offered to every later round instead of ``items``. Raises the first error."""
    for n, group in enumerate(groups):
        if not _takes_part(group):
            continue
        try:
            _agree(group, items if error is None else None, error, device, f"{kind} {n}")
        except Exception as raised:
            error = error or raised
    if error is not None:
        raise error


def _group_key(group):
    return dist.group.WORLD if group is None else group


# The point-to-point tag of the checks on a gloo group: not the data's (the ring's sends and receives use tag 0),
# and gloo matches tagged sends and receives apart from every collective.
CHECK_TAG = 0x5246


@dataclass(frozen=True)
class _Channel:
    """Where a group's checks travel: ``group`` with CPU tensors, by tagged sends and receives on the group
    itself (``point_to_point``) or by all-gathers on a gloo group of their own over the same ranks; on
    ``device`` only where this build of torch has no gloo."""

    group: Any
    point_to_point: bool
    device: torch.device = torch.device("cpu")


def _control_channel(group, device: Optional[torch.device]) -> _Channel:
    """The channel of ``group``'s checks. They are host-side and must never meet a data transfer of another
    rank: with ``once``, a rank whose arguments changed alone checks while the others exchange, and a check that
    met their all-gather of K/V (another size) would make gloo abort the process.

    * A group with gloo (CPU tensors): tagged sends and receives on the group itself, which gloo never matches
      with the data's untagged ones nor with any collective. No other group is made.
    * A device-only group (NCCL, XCCL): checks on the group itself would need device tensors whose values the
      host then reads, a host-device synchronisation at every call that stalls the GPU queue layer after layer.
      Their all-gathers run on a gloo group over the same ranks instead, made at the group's first check (which
      every rank of the group reaches: the first call is always checked) and kept for the process. Where gloo is
      not available they fall back to the group itself, on ``device``.
    """
    key = _group_key(group)
    if "gloo" in str(dist.get_backend(key)):
        return _Channel(key, point_to_point=True)
    if key not in _control_groups:
        _control_groups[key] = _new_control_group(key) if dist.is_gloo_available() else None
    control = _control_groups[key]
    if control is None:
        return _Channel(key, point_to_point=False, device=device or torch.device("cpu"))
    return _Channel(control, point_to_point=False)


def _new_control_group(group):
    timeout = wait_timeout()
    try:
        return dist.new_group(dist.get_process_group_ranks(group), backend="gloo", timeout=timeout,
                              use_local_synchronization=True)
    except RuntimeError as error:  # its ranks did not meet within the bound
        raise RankWaitTimeout(
            f"cross-rank checks: the gloo group for the checks of a {dist.get_backend(group)} group was not made "
            f"by all of its ranks within {timeout.total_seconds():g} s ({TIMEOUT_ENV}). PyTorch names a group its "
            "members make alone after how many process groups each of them holds: make the same process groups on "
            f"the ranks of this group, or set {MODE_ENV}=never") from error


def _all_gather(mine: torch.Tensor, channel: _Channel, what: str):
    size = dist.get_world_size(channel.group)
    if not channel.point_to_point:
        gathered = [torch.empty_like(mine) for _ in range(size)]
        wait_bounded([dist.all_gather(gathered, mine, group=channel.group, async_op=True)], what)
        return gathered
    me = dist.get_rank(channel.group)
    gathered = [mine if r == me else torch.empty_like(mine) for r in range(size)]
    works = [dist.isend(mine, group=channel.group, group_dst=r, tag=CHECK_TAG) for r in range(size) if r != me]
    works += [dist.irecv(gathered[r], group=channel.group, group_src=r, tag=CHECK_TAG) for r in range(size) if r != me]
    wait_bounded(works, what)
    return gathered


def _gather_ints(values, channel: _Channel, what: str):
    mine = torch.tensor(values, dtype=torch.int64, device=channel.device)
    return [g.tolist() for g in _all_gather(mine, channel, what)]


def _gather_texts(text: str, lengths, channel: _Channel, what: str):
    """Every rank's ``text`` (its UTF-8 length already gathered in ``lengths``)."""
    data = text.encode()
    mine = torch.tensor(list(data.ljust(max(lengths), b"\0")), dtype=torch.uint8, device=channel.device)
    return [bytes(g[:n].cpu().tolist()).decode() for g, n in zip(_all_gather(mine, channel, what), lengths)]


def _fingerprint(description: str) -> int:
    return int.from_bytes(hashlib.blake2b(description.encode(), digest_size=8).digest(), "little", signed=True)


def _pairs(items: Optional[tuple]):
    """``items`` as ``[name, repr(value)]`` pairs (JSON-able, what the other ranks are told), or None."""
    return None if items is None else [[name, repr(value)] for name, value in items]


# The two kinds of check round: before a call's first exchange (agree) and after its last (finish). Both send
# the same four integers per rank, so that when they meet (with `once`, a rank whose arguments changed alone
# checks before exchanging while the others, on a device whose exchanges do not block the host, already check
# after theirs) every rank reads a report instead of an all-gather of another size, which gloo answers by
# aborting the process.
_BEFORE, _AFTER = 0, 1


def _check_round(group, device, phase: int, failed: bool, fingerprint: int, report: dict, what: str):
    """One round on the control channel: every rank's ``(phase, failed, fingerprint)``; and only when something
    is off (a failure, another phase, another fingerprint) every rank's ``report``. Whether the second
    all-gather runs depends only on what the first gathered, so every rank decides alike. Returns None when
    all is well, else ``{global rank: (phase, failed, report)}`` (messages name global ranks, as launchers'
    logs do)."""
    channel = _control_channel(group, device)
    text = json.dumps(report)
    status = _gather_ints([phase, int(failed), fingerprint, len(text.encode())], channel, what)
    if not any(bad for _, bad, _, _ in status) and len({(p, fp) for p, _, fp, _ in status}) == 1:
        return None
    texts = _gather_texts(text, [n for *_, n in status], channel, what)
    return {rank: (p, bool(bad), json.loads(t))
            for rank, (p, bad, _, _), t in zip(dist.get_process_group_ranks(channel.group), status, texts)}


def _shared_first(error: Optional[BaseException], sharing_failed: BaseException) -> BaseException:
    """A check round that could not run (a timeout, a broken group): this rank's own error comes first."""
    if error is None:
        return sharing_failed
    error.add_note(f"(this rank's error could not be shared with the group: {sharing_failed})")
    return error


def _agree(group, items: Optional[tuple], error: Optional[BaseException], device, kind: str) -> None:
    """One agreement round. ``items`` None: this rank's validation raised ``error`` (re-raised here)."""
    key = (_group_key(group), kind)
    if error is None:
        if mode() == "once" and _last_agreed.get(key) == items:
            return
        arguments = _pairs(items)
        fingerprint = _fingerprint(json.dumps(arguments))
        report = {"arguments": arguments, "last_agreed": _pairs(_last_agreed.get(key))}
    else:
        fingerprint, report = 0, {"error": f"{type(error).__name__}: {error}"}
    try:
        ranks = _check_round(group, device, _BEFORE, error is not None, fingerprint, report,
                             "argument agreement before the first exchange")
    except Exception as sharing_failed:
        raise _shared_first(error, sharing_failed) from None
    if ranks is None:
        _last_agreed[key] = items
        return
    _raise_report(ranks, error)


class ComputeFailure:
    """The first error this rank's compute raised during one call, and where (for the other ranks' message)."""

    def __init__(self, error: BaseException, where: str):
        self.error, self.where = error, where


def finish(group, failure: Optional[ComputeFailure], device: torch.device, what: str) -> None:
    """After the last exchange of ``what`` (e.g. "ring forward"): if any rank's compute failed, every rank raises.

    The failing rank raises its own error; the others a :class:`PeerRankError` naming it and why. A call from
    another thread that entered ``group`` meanwhile (comm/in_flight.py) counts as this rank's failure.
    """
    if failure is None and (overlapped := in_flight.intruder(group)) is not None:
        failure = ComputeFailure(overlapped, "the end of the call")
    if not _takes_part(group):
        if failure is not None:
            raise failure.error
        return
    error = None if failure is None else failure.error
    report = {"what": what,
              "failure": None if failure is None else f"{failure.where}: {type(error).__name__}: {error}"}
    try:
        ranks = _check_round(group, device, _AFTER, failure is not None, 0, report,
                             f"{what}: failure check after the last exchange")
    except Exception as sharing_failed:
        raise _shared_first(error, sharing_failed) from None
    if ranks is not None:
        _raise_report(ranks, error)


def finish_all(groups, failure: Optional[ComputeFailure], device: torch.device, what: str) -> None:
    """:func:`finish` over several groups in turn (a mesh's rows, then its columns): a failure heard of in one
    round is passed on in the next, so every rank of the mesh hears of a failure anywhere in it."""
    first = None
    for group in groups:
        try:
            finish(group, failure, device, what)
        except BaseException as error:  # the later rounds must still run: their other ranks wait in them
            first = first or error
            failure = failure or ComputeFailure(error, "a rank of another of its groups")
    if first is not None:
        raise first


def _raise_report(ranks, error: Optional[BaseException]) -> None:
    """Every rank raises what a check round found (``ranks``: phase, failed, report per rank): this rank's own
    ``error`` if it has one (what the others did in a note), else the same error as every other rank."""
    before = [r for r, (phase, _, _) in ranks.items() if phase == _BEFORE]
    after = [r for r, (phase, _, _) in ranks.items() if phase == _AFTER]
    failed = [r for r, (_, bad, _) in ranks.items() if bad]
    if before and after:
        error_type, message = _unmatched_report(ranks, before, after)
        if error is not None:
            error.add_note(message)
            raise error
        raise error_type(message)
    if not failed:  # all checked before exchanging, none rejected its arguments: they differ
        raise RanksDisagreeError(_disagreement({r: report["arguments"] for r, (_, _, report) in ranks.items()}))
    if after:
        what = ranks[after[0]][2]["what"]
        message = f"{what}: " + "; ".join(f"rank {r} failed at {ranks[r][2]['failure']}" for r in failed)
        note = f"{what}: ranks that failed: "
    else:
        message = "; ".join(f"rank {r} rejected its arguments: {ranks[r][2]['error']}" for r in failed)
        note = "ranks that rejected their arguments: "
    if error is not None:
        if len(failed) > 1:
            error.add_note(note + ", ".join(map(str, failed)))
        raise error
    raise PeerRankError(message)


def _disagreement(pairs_by_rank: dict) -> str:
    """Each argument whose value differs between ranks, with every rank's value."""
    per_rank = {r: dict(pairs) for r, pairs in pairs_by_rank.items()}
    first = next(iter(pairs_by_rank.values()))
    differing = [name for name, _ in first if len({d.get(name) for d in per_rank.values()}) > 1]
    differing += sorted({name for d in per_rank.values() for name in d} - set(dict(first)))
    return "; ".join(
        f"{name}: expected the same value on every rank of the group, got "
        + ", ".join(f"rank {r}: {d.get(name, 'absent')}" for r, d in per_rank.items())
        for name in differing)


def _unmatched_report(ranks, before, after):
    """``before`` ranks checked a call before its first exchange while ``after`` ranks had made the exchanges of a
    call they did not check (``once``: their arguments were those the group last agreed on)."""
    parts = []
    for r in before:
        report = ranks[r][2]
        if "error" in report:
            parts.append(f"rank {r} rejected its arguments: {report['error']}")
        elif report["last_agreed"] is None:
            parts.append(f"rank {r} checked a call of a kind the group had not agreed on yet")
        else:
            old, new = dict(report["last_agreed"]), dict(report["arguments"])
            parts.append(f"rank {r}'s arguments differ from the call the group last agreed on: " + "; ".join(
                f"{name}: {old.get(name, 'absent')} -> {new.get(name, 'absent')}"
                for name in dict.fromkeys([*old, *new]) if old.get(name) != new.get(name)))
    parts += [f"rank {r} failed at {ranks[r][2]['failure']}" for r in after if ranks[r][1]]
    what = ranks[after[0]][2]["what"]
    message = (f"ranks {', '.join(map(str, before))} checked their arguments before exchanging while ranks "
               f"{', '.join(map(str, after))} had made the exchanges of the {what} without a check ({MODE_ENV}=once "
               "checks only a call that differs from the last one the group agreed on): " + "; ".join(parts)
               + ". Those exchanges were not matched on every rank, so the process group cannot serve further "
               f"calls; with {MODE_ENV}=always a change on one rank is named before any exchange")
    changed = any("error" not in ranks[r][2] for r in before)
    return (RanksDisagreeError if changed else PeerRankError), message
