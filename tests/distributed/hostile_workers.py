"""Rank functions for tests/distributed/test_hostile.py and test_agreement.py (module level, so spawn can pickle them).

Faults are injected by a kernel backend that serves the reference kernels but raises at a chosen kernel call
(counted per forward and per backward call) on chosen ranks.
"""

from __future__ import annotations

import os
import time

import torch

import ring_flash_attn as rfa
from ring_flash_attn.kernels import get_backend, register_backend
from ring_flash_attn.kernels.base import KernelBackend
from ring_flash_attn.ring.layouts import get_layout
from tests.distributed.workers import make_inputs, oracle, ring_errors
from tests.tolerances import rel_err


class InjectedFault(RuntimeError):
    pass


class FaultyBackend(KernelBackend):
    """The reference kernels, raising at kernel call ``index`` of ``phase`` ("forward"/"backward") on ``ranks``."""

    name = "test_faulty"

    def __init__(self):
        self.reference = get_backend("reference")
        self.arm(None, -1, ())

    def arm(self, phase, index, ranks):
        self.phase, self.index, self.ranks = phase, index, tuple(ranks)
        self.calls = {"forward": 0, "backward": 0}

    def unsupported_reason(self, features):
        return None

    def _count(self, phase):
        n = self.calls[phase]
        self.calls[phase] += 1
        if phase == self.phase and n == self.index and torch.distributed.get_rank() in self.ranks:
            raise InjectedFault(f"injected {phase} fault at kernel call {n}")

    def forward(self, q, k, v, **kw):
        self._count("forward")
        return self.reference.forward(q, k, v, **kw)

    def backward(self, dout, q, k, v, out, lse, **kw):
        self._count("backward")
        return self.reference.backward(dout, q, k, v, out, lse, **kw)


CASE = dict(batch=1, heads=4, heads_k=2, head_dim=8, seed=7)


def _clean_call_errors(rank, world_size, exchange, seed, variant="ring", causal=False):
    """One call on fresh inputs with the reference backend; max relative error of out/lse/dq/dk/dv vs the oracle."""
    case = dict(CASE, seqlen=4 * world_size, seed=seed)
    q, k, v, dout = make_inputs(case)
    ref = oracle(q, k, v, dout, causal=causal, window=(-1, -1), scale=8 ** -0.5)
    layout = get_layout(variant)
    local = lambda x, dim=1: layout.shard(x, rank, world_size, dim)  # noqa: E731
    ql, kl, vl = (local(t).requires_grad_() for t in (q, k, v))
    out, lse = rfa.ring_attention(ql, kl, vl, variant=variant, causal=causal, exchange=exchange,
                                  heads_k_stride=1, backend="reference")
    out.backward(local(dout))
    got = (out, lse, ql.grad, kl.grad, vl.grad)
    want = (local(ref[0]), local(ref[1], dim=2), local(ref[2]), local(ref[3]), local(ref[4]))
    return max(rel_err(g, w) for g, w in zip(got, want))


def _faulty_call(rank, world_size, exchange, backend):
    q, k, v, dout = (rfa.shard_sequence(t, "ring", rank, world_size)
                     for t in make_inputs(dict(CASE, seqlen=4 * world_size)))
    q.requires_grad_()
    out, _ = rfa.ring_attention(q, k, v, variant="ring", exchange=exchange, heads_k_stride=1, backend=backend.name)
    out.backward(dout)


def fault_injection(rank, world_size, failing_rank_sets):
    """A fault at every kernel call of a forward and of a backward, for both exchanges, on each set of failing ranks.
    Returns the cases (exchange, phase, index, failing ranks) and per case: what this rank raised, how long the call
    took, and the error of a clean call right after on the same group."""
    backend = FaultyBackend()
    register_backend(backend)
    cases = []
    for exchange in ("ring", "allgather"):
        backend.arm(None, -1, ())
        _faulty_call(rank, world_size, exchange, backend)  # unarmed: counts the kernel calls
        calls = dict(backend.calls)
        cases += [(exchange, phase, index, tuple(ranks)) for phase in ("forward", "backward")
                  for index in range(calls[phase]) for ranks in failing_rank_sets]
    report = []
    for n, (exchange, phase, index, ranks) in enumerate(cases):
        backend.arm(phase, index, ranks)
        started = time.perf_counter()
        raised = _raised(lambda: _faulty_call(rank, world_size, exchange, backend))
        elapsed = time.perf_counter() - started
        backend.arm(None, -1, ())
        report.append((raised, elapsed, _clean_call_errors(rank, world_size, exchange, seed=100 + n)))
    return cases, report


def _raised(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001
        return type(error).__name__, str(error)
    return None, "no error raised"


def double_backward_and_gaps(rank, world_size):
    """Double backward (ring and all-gather) and the validation gaps of issue 13, each followed by nothing
    (they raise before any exchange); then one clean call per exchange checked against the oracle."""
    q, k, v, dout = (rfa.shard_sequence(t, "zigzag", rank, world_size)
                     for t in make_inputs(dict(CASE, seqlen=4 * world_size)))
    report = {}
    for exchange in ("ring", "allgather"):
        ql = q.clone().requires_grad_()
        out = rfa.ring_attention(ql, k, v, variant="zigzag", causal=True, exchange=exchange, heads_k_stride=1)[0]
        report[f"double backward {exchange}"] = _raised(
            lambda: torch.autograd.grad((out * dout).sum(), ql, create_graph=True))
    tokens = lambda n: (torch.randn(n, 4, 8), torch.randn(n, 2, 8), torch.randn(n, 2, 8))  # noqa: E731
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    outsider = torch.distributed.new_group([0, 1])
    gaps = {
        "softcap inf": lambda: rfa.ring_flash_attn_func(q, k, v, softcap=float("inf")),
        "softcap nan": lambda: rfa.ring_flash_attn_func(q, k, v, softcap=float("nan")),
        "head_dim 0": lambda: rfa.ring_flash_attn_func(q[..., :0], k[..., :0], v[..., :0]),
        "max_seqlen None": lambda: rfa.ring_flash_attn_varlen_func(*tokens(8), i32([0, 8]), None),
        "cu_seqlens decreasing, small max_seqlen": lambda: rfa.ring_flash_attn_varlen_func(
            *tokens(8), i32([0, 6, 2, 8]), 4),
        "llama3 prepare empty cu_seqlens": lambda: rfa.llama3_flash_attn_prepare_cu_seqlens(
            i32([]), True, rank, world_size),
    }
    report.update({name: _raised(call) for name, call in gaps.items()})
    if rank == world_size - 1:
        report["shard outside the group"] = _raised(
            lambda: rfa.RingAttention(variant="ring", causal=False, group=outsider).shard(q))
    clean = {exchange: _clean_call_errors(rank, world_size, exchange, seed=31, variant="zigzag", causal=True)
             for exchange in ("ring", "allgather")}
    return report, clean


def hostile_world(rank, world_size, failing_rank_sets):
    """Both of the above in one world (one start of the ranks)."""
    return fault_injection(rank, world_size, failing_rank_sets), double_backward_and_gaps(rank, world_size)


def disagreements(rank, world_size, cases):
    """For each case, rank 0 makes the base call and rank 1 the changed one (cases are built by the test: a list of
    (name, kwargs for rank 0, kwargs for rank 1)); what each rank raised. Then a clean call (oracle error)."""
    os.environ["RING_FLASH_ATTN_AGREE"] = "always"
    report = [(name, _raised(lambda: _call(rank, **(base if rank == 0 else changed))))
              for name, base, changed in cases]
    return report, _clean_call_errors(rank, world_size, "ring", seed=5, variant="zigzag", causal=True)


def _call(rank, *, api="ring_attention", seqlen=8, heads=4, heads_k=2, head_dim=8, dtype="float32",
          requires_grad=False, cu_seqlens=None, **kwargs):
    """One call of ``api`` on random inputs described by the arguments (the test's cases vary them per rank)."""
    g = torch.Generator().manual_seed(rank)
    dt = getattr(torch, dtype)
    lead = (seqlen,) if cu_seqlens is not None or api.startswith("llama3") else (1, seqlen)
    q = torch.randn(*lead, heads, head_dim, generator=g).to(dt).requires_grad_(requires_grad)
    k, v = (torch.randn(*lead, heads_k, head_dim, generator=g).to(dt) for _ in range(2))
    if cu_seqlens is not None:
        kwargs["cu_seqlens"] = torch.tensor(cu_seqlens, dtype=torch.int32)
    if api == "llama3":
        cu = torch.tensor(kwargs.pop("global_cu_seqlens"), dtype=torch.int32)
        args = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, kwargs.get("causal", False), rank, 2)
        local_k_slice = kwargs.pop("local_k_slice", args[4])
        return rfa.llama3_flash_attn_varlen_func(q, k, v, *args[:4], kwargs.pop("heads_k_stride", 1), local_k_slice,
                                                 **kwargs)
    if api == "gather_sequence":
        return rfa.gather_sequence(q, kwargs["variant"])
    if api == "func":  # the replaced project's API: the variant is in the function's name
        kwargs.pop("variant")
        return rfa.ring_flash_attn_func(q, k, v, **kwargs)
    return rfa.ring_attention(q, k, v, **kwargs)


def once_mode(rank, world_size, timeout_s, exchange="ring"):
    """RING_FLASH_ATTN_AGREE=once: a repeated call skips the agreement collective; then rank 1's arguments become
    invalid while rank 0's stay the same (rank 0 skips the check, rank 1 waits in it): both raise within the bound.
    With ``exchange="allgather"`` rank 0 waits in an all-gather of K/V on the group while rank 1 checks (on a group
    of its own: on the same group the two all-gathers of different sizes aborted the process inside gloo)."""
    from ring_flash_attn import agreement

    os.environ.update(RING_FLASH_ATTN_AGREE="once", RING_FLASH_ATTN_WAIT_TIMEOUT_S=str(timeout_s))
    agreement._last_agreed.clear()
    gathers = []
    original = agreement._gather_ints
    agreement._gather_ints = lambda *a, **kw: gathers.append(a[-1]) or original(*a, **kw)
    first = _clean_call_errors(rank, world_size, exchange, seed=3)
    after_first = list(gathers)
    second = _clean_call_errors(rank, world_size, exchange, seed=4)
    after_second = gathers[len(after_first):]
    started = time.perf_counter()  # the same moment on both ranks (after the last call they both made)
    if rank == 1:  # rank 0 waits first, so its bound ends first: a rank whose wait times out may close its
        time.sleep(1.0)  # connections, and the other would then see that instead of its own timeout
    if rank == 0:  # the call the group agreed on: skips the check and waits in the first exchange
        raised = _raised(lambda: _clean_call_errors(rank, world_size, exchange, seed=4))
    else:
        raised = _raised(lambda: _call(rank, seqlen=4, dtype="float64", requires_grad=True, softcap=-1.0,
                                       backend="reference", exchange=exchange, heads_k_stride=1))
    elapsed = time.perf_counter() - started
    if rank == 1:  # stay until rank 0's waits (one per transfer) have run out: an exiting process closes its
        time.sleep(2 * timeout_s + 2)  # connections, which rank 0 would see first
    return dict(first=first, second=second, agreements_first=[w for w in after_first if "agreement" in w],
                agreements_second=[w for w in after_second if "agreement" in w], raised=raised, elapsed=elapsed)


class _HostReturnsAtOnce:
    """What an NCCL exchange's ``wait()`` does on the host: return at once (the device waits, not the host)."""

    def wait(self):
        pass


def once_mode_unblocking_exchanges(rank, world_size, timeout_s):
    """RING_FLASH_ATTN_AGREE=once on a group whose exchanges do not block the host (NCCL, XCCL; stood in for on
    rank 0 by exchanges that return at once, so it runs the agreed call to its end): rank 1 alone changes an
    argument, then alone rejects one. Rank 1 checks before exchanging while rank 0 checks after its last exchange;
    the two checks meet and both ranks raise naming rank 1 and what changed, well within the bound. Then both make
    the agreed call again (no stand-in), against the float64 oracle: the checks stayed in step."""
    from unittest import mock

    from ring_flash_attn import agreement
    from ring_flash_attn.comm.ring import RingComm

    os.environ.update(RING_FLASH_ATTN_AGREE="once", RING_FLASH_ATTN_WAIT_TIMEOUT_S=str(timeout_s))
    agreement._last_agreed.clear()
    _clean_call_errors(rank, world_size, "ring", seed=3)
    report = {}
    for name, changed in (("changed", dict(softcap=5.0)), ("rejected", dict(softcap=-1.0))):
        started = time.perf_counter()
        if rank == 0:
            with mock.patch.object(RingComm, "exchange", lambda *args, **kwargs: _HostReturnsAtOnce()):
                raised = _raised(lambda: _clean_call_errors(rank, world_size, "ring", seed=4))
        else:
            raised = _raised(lambda: _call(rank, seqlen=4, dtype="float64", requires_grad=True, backend="reference",
                                           **changed))
        report[name] = dict(raised=raised, elapsed=time.perf_counter() - started)
    report["after"] = _clean_call_errors(rank, world_size, "ring", seed=5)
    return report


def agreement_world(rank, world_size, cases, timeout_s):
    """:func:`disagreements`, :func:`once_mode_unblocking_exchanges`, then :func:`once_mode` (last: it leaves the
    group unusable), in one world."""
    return (disagreements(rank, world_size, cases), once_mode_unblocking_exchanges(rank, world_size, timeout_s),
            once_mode(rank, world_size, timeout_s))


def control_channel_world(rank, world_size):
    """A device-only group (NCCL/XCCL, stood in for by reporting "nccl" on gloo ranks): the checks go to a gloo
    group over the same ranks, made once, on CPU tensors, so they never make the host wait for a device; and a
    failure still reaches every rank through it. A gloo group's checks are tagged sends and receives on the group
    itself (no other group)."""
    from unittest import mock

    import torch.distributed as dist

    from ring_flash_attn import agreement

    accelerator = torch.device("meta")  # any non-CPU device: no tensor of the checks may land on it
    with mock.patch.object(agreement.dist, "get_backend", return_value="nccl"):
        channel = agreement._control_channel(None, accelerator)
        again = agreement._control_channel(None, accelerator)
        report = {"device": str(channel.device), "cached": channel.group is again.group,
                  "separate": channel.group is not dist.group.WORLD, "point_to_point": channel.point_to_point}
        agreement.finish(None, None, accelerator, "control test, no failure")
        failure = agreement.ComputeFailure(RuntimeError("injected"), "forward step 0") if rank == 1 else None
        try:
            agreement.finish(None, failure, accelerator, "control test")
        except (RuntimeError, agreement.PeerRankError) as error:
            report["raised"] = f"{type(error).__name__}: {error}"
    report["control_backend"] = str(dist.get_backend(channel.group))  # the real answer, outside the stand-in
    gloo = agreement._control_channel(None, torch.device("cpu"))
    report["gloo_channel"] = (gloo.group is dist.group.WORLD, gloo.point_to_point)
    return report


def control_group_mismatch_world(rank, world_size, timeout_s):
    """PyTorch names a group its members make alone after how many groups each holds: when rank 0 holds one more
    (a group of rank 0 alone, made by every rank), the checks' gloo group of a device-only group cannot be made.
    Every rank raises within the bound, naming why, instead of waiting forever."""
    from unittest import mock

    import torch.distributed as dist

    from ring_flash_attn import agreement

    os.environ[agreement.TIMEOUT_ENV] = str(timeout_s)
    dist.new_group([0])
    started = time.perf_counter()
    with mock.patch.object(agreement.dist, "get_backend", return_value="nccl"):
        raised = _raised(lambda: agreement.finish(None, None, torch.device("meta"), "control test"))
    return dict(raised=raised, elapsed=time.perf_counter() - started)


def one_rank_world(rank, world_size):
    """A group of one rank makes no check collective (nothing to agree on, nobody to tell), its results still
    match the float64 oracle, and its compute errors still raise."""
    from unittest import mock

    import torch.distributed as dist

    from ring_flash_attn import agreement

    def no_collective(*args, **kwargs):
        raise AssertionError("a check collective ran on a group of one rank")

    report = {}
    with mock.patch.object(agreement.dist, "all_gather", no_collective):
        report["errors"] = ring_errors(rank, world_size, [dict(variant="zigzag", causal=True, backend="reference",
                                                               dtype="float64", heads_k=2, batch=1, seqlen=8,
                                                               heads=4, head_dim=8, seed=99)])[0]
        try:
            agreement.finish(None, agreement.ComputeFailure(RuntimeError("injected"), "forward step 0"),
                             torch.device("cpu"), "one rank")
        except RuntimeError as error:
            report["raised"] = str(error)
    report["world_size"] = dist.get_world_size()
    return report
