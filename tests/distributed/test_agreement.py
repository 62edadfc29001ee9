"""Ranks agree before they exchange (issue 13): rank 1 changes one argument that every rank must share, in a
byte-different and, where one exists, a byte-equal way (the transfers would have matching sizes); or rank 1 alone
rejects its arguments. Every rank raises the same clear error (or the other rank names rank 1's), nothing aborts,
nothing hangs, and the group then serves a call that matches the float64 oracle."""

import re

import pytest
import torch

from tests.distributed.harness import run_world
from tests.distributed.hostile_workers import agreement_world
from tests.tolerances import GRADIENT

BASE = dict(variant="ring", backend="reference")
VARLEN = dict(BASE, seqlen=8, cu_seqlens=[0, 4, 8])
GATHER = dict(BASE, exchange="allgather", heads_k_stride=1)
LLAMA3 = dict(api="llama3", seqlen=8, global_cu_seqlens=[0, 4, 16], backend="reference")

# name: (rank 0's call, rank 1's call, the argument named in the error, or None: rank 1 rejects its own arguments)
DISAGREE = {
    "seqlen (byte-different)": (
        BASE, dict(BASE, seqlen=16), r"q shape: .*rank 0: \(1, 8, 4, 8\), rank 1: \(1, 16, 4, 8\)"),
    "seqlen and heads (byte-equal)": (
        BASE, dict(BASE, seqlen=16, heads=2, heads_k=1), r"k shape: .*rank 0: \(1, 8, 2, 8\), rank 1: \(1, 16, 1, 8\)"),
    "dtype float16 / bfloat16 (byte-equal)": (
        dict(BASE, dtype="float16"), dict(BASE, dtype="bfloat16"),
        r"dtype: .*rank 0: torch.float16, rank 1: torch.bfloat16"),
    "dtype float32 / float64 (byte-different)": (BASE, dict(BASE, dtype="float64"), r"dtype: .*rank 1: torch.float64"),
    "causal": (BASE, dict(BASE, causal=True), r"causal: .*rank 0: False, rank 1: True"),
    "softmax_scale": (
        dict(BASE, softmax_scale=0.25), dict(BASE, softmax_scale=0.5), r"softmax_scale: .*rank 0: 0.25, rank 1: 0.5"),
    "window_size": (BASE, dict(BASE, window_size=(2, 0)), r"window_size: .*rank 0: \(-1, -1\), rank 1: \(2, 0\)"),
    "softcap": (BASE, dict(BASE, softcap=5.0), r"softcap: .*rank 0: 0.0, rank 1: 5.0"),
    "variant zigzag / stripe (byte-equal)": (
        dict(BASE, variant="zigzag", causal=True), dict(BASE, variant="stripe", causal=True),
        r"variant: .*rank 0: 'zigzag', rank 1: 'stripe'"),
    "exchange": (
        BASE, dict(BASE, exchange="allgather", heads_k_stride=1), r"exchange: .*rank 0: 'ring', rank 1: 'allgather'"),
    "cu_seqlens (byte-equal)": (
        VARLEN, dict(VARLEN, cu_seqlens=[0, 2, 8]), r"cu_seqlens: .*rank 0: \(0, 4, 8\), rank 1: \(0, 2, 8\)"),
    "cu_seqlens (byte-different)": (
        VARLEN, dict(VARLEN, seqlen=16, cu_seqlens=[0, 4, 16]), r"cu_seqlens: .*rank 1: \(0, 4, 16\)"),
    "heads_k_stride (all-gather)": (GATHER, dict(GATHER, heads_k_stride=2), r"heads_k_stride: .*rank 0: 1, rank 1: 2"),
    "heads_k_stride (llama3)": (LLAMA3, dict(LLAMA3, heads_k_stride=2), r"heads_k_stride: .*rank 0: 1, rank 1: 2"),
    "requires_grad": (dict(BASE, requires_grad=True), BASE, r"requires_grad: .*rank 0: True, rank 1: False"),
    "alibi_slopes on one rank": (
        BASE, dict(BASE, alibi_slopes=torch.full((4,), 0.1)), r"alibi_slopes: .*rank 0: None, rank 1: \(4,\)"),
    "gather_sequence seqlen": (dict(BASE, api="gather_sequence"), dict(BASE, api="gather_sequence", seqlen=16),
                               r"shape: .*rank 0: \(1, 8, 4, 8\), rank 1: \(1, 16, 4, 8\)"),
    "gather_sequence requires_grad": (
        dict(BASE, api="gather_sequence", requires_grad=True), dict(BASE, api="gather_sequence"),
        r"requires_grad: .*rank 0: True, rank 1: False"),
    "invalid softcap on rank 1": (BASE, dict(BASE, softcap=-1.0), None),
    "dropout on rank 1": (dict(BASE, api="func"), dict(BASE, api="func", dropout_p=0.1), None),
    "zigzag non-causal on rank 1": (dict(BASE, variant="zigzag", causal=True), dict(BASE, variant="zigzag"), None),
    "llama3 bad local_k_slice on rank 1": (LLAMA3, dict(LLAMA3, local_k_slice=slice(0, 100)), None),
}


TIMEOUT_S = 3.0  # the bounded wait in the once-mode case


@pytest.fixture(scope="module")
def world():
    cases = [(name, base, changed) for name, (base, changed, _) in DISAGREE.items()]
    return run_world(2, agreement_world, cases, TIMEOUT_S, timeout_s=120)


@pytest.fixture(scope="module")
def reports(world):
    return [disagreement_report for disagreement_report, _, _ in world]


@pytest.fixture(scope="module")
def unblocking(world):
    return [unblocking_report for _, unblocking_report, _ in world]


@pytest.fixture(scope="module")
def once(world):
    return [once_report for _, _, once_report in world]


@pytest.mark.parametrize("name", list(DISAGREE))
def test_every_rank_raises_naming_the_argument(reports, name):
    n = list(DISAGREE).index(name)
    (kind0, message0), (kind1, message1) = (report[n][1] for report, _ in reports)
    pattern = DISAGREE[name][2]
    if pattern is not None:
        assert kind0 == kind1 == "RanksDisagreeError" and message0 == message1, (message0, message1)
        assert re.search(f"(^|; ){pattern}", message0), message0
        assert "expected the same value on every rank of the group" in message0
    else:
        assert kind1 in ("ValueError", "NotImplementedError"), (kind1, message1)
        assert kind0 == "PeerRankError" and message0 == f"rank 1 rejected its arguments: {kind1}: {message1}"


def test_group_serves_a_call_after_the_disagreements(reports):
    assert all(clean <= GRADIENT[torch.float64] for _, clean in reports)


def test_once_agrees_on_a_new_call_and_skips_a_repeated_one(once):
    """The first call agrees twice: on its arguments, and in its backward on whether the LSE has a gradient."""
    for report in once:
        assert report["first"] <= GRADIENT[torch.float64] and report["second"] <= GRADIENT[torch.float64]
        assert len(report["agreements_first"]) == 2 and report["agreements_second"] == []


def test_once_rank_that_changes_alone_fails_every_rank_within_the_bound(once):
    """Rank 1 rejects its arguments and waits in the agreement; rank 0 made the agreed call and skipped it, so it
    waits in the first exchange. Both raise within the bounded wait (not the process-group timeout)."""
    (kind0, message0), (kind1, message1) = once[0]["raised"], once[1]["raised"]
    assert kind0 == "RankWaitTimeout" and "ring exchange with ranks 1 (send) and 1 (receive)" in message0
    assert kind1 == "ValueError" and message1.startswith("softcap: expected a finite value >= 0")
    # Rank 0 may wait out the bound once per transfer of the exchange (send, then receive).
    assert all(TIMEOUT_S <= r["elapsed"] < 2 * TIMEOUT_S + 5 for r in once), [r["elapsed"] for r in once]


def test_once_rank_that_changes_alone_in_an_all_gather_call_fails_every_rank_within_the_bound():
    """As above with the all-gather exchange: rank 0 waits in the all-gather of K/V while rank 1 checks; both raise
    within the bound (the check on the data group itself made gloo abort the process: different sizes)."""
    from tests.distributed.hostile_workers import once_mode

    reports = run_world(2, once_mode, TIMEOUT_S, "allgather", timeout_s=90)
    (kind0, message0), (kind1, message1) = (report["raised"] for report in reports)
    # Rank 0 waits out its bound, or hears first that rank 1's own wait ended and closed its connection.
    assert kind0 == "RankWaitTimeout" and message0.startswith(("all-gather of K/V: not every rank",
                                                               "all-gather of K/V: a rank of the group closed")), message0
    assert kind1 == "ValueError" and message1.startswith("softcap: expected a finite value >= 0"), message1
    assert all(TIMEOUT_S <= r["elapsed"] < 2 * TIMEOUT_S + 5 for r in reports), [r["elapsed"] for r in reports]
    assert all(r["first"] <= GRADIENT[torch.float64] and r["second"] <= GRADIENT[torch.float64] for r in reports)


ONCE_UNMATCHED = ("ranks 1 checked their arguments before exchanging while ranks 0 had made the exchanges of the ring "
                  "forward without a check (RING_FLASH_ATTN_AGREE=once checks only a call that differs from the last "
                  "one the group agreed on): ")


def test_once_lone_change_meets_the_others_check_after_unblocking_exchanges(unblocking):
    """Exchanges that do not block the host (NCCL): rank 0 runs the agreed call to its check after the last
    exchange while rank 1, whose softcap changed alone, checks before exchanging. No abort (the two checks have one
    shape), no timeout: both raise the same error naming rank 1 and the change."""
    (kind0, message0), (kind1, message1) = (report["changed"]["raised"] for report in unblocking)
    assert kind0 == kind1 == "RanksDisagreeError" and message0 == message1, (message0, message1)
    assert message0.startswith(ONCE_UNMATCHED + "rank 1's arguments differ from the call the group last agreed on: "
                               "softcap: 0.0 -> 5.0. "), message0
    assert "the process group cannot serve further calls" in message0
    assert all(report["changed"]["elapsed"] < TIMEOUT_S for report in unblocking), unblocking


def test_once_lone_rejection_meets_the_others_check_after_unblocking_exchanges(unblocking):
    (kind0, message0), (kind1, message1) = (report["rejected"]["raised"] for report in unblocking)
    assert kind1 == "ValueError" and message1.startswith("softcap: expected a finite value >= 0"), message1
    assert kind0 == "PeerRankError" and message0.startswith(
        ONCE_UNMATCHED + f"rank 1 rejected its arguments: ValueError: {message1}. "), message0
    assert all(report["rejected"]["elapsed"] < TIMEOUT_S for report in unblocking), unblocking


def test_checks_stay_in_step_after_they_met(unblocking):
    assert all(report["after"] <= GRADIENT[torch.float64] for report in unblocking), unblocking


def test_device_only_group_checks_on_a_gloo_side_channel():
    from tests.distributed.hostile_workers import control_channel_world

    reports = run_world(2, control_channel_world, timeout_s=60)
    for report in reports:
        assert report["device"] == "cpu" and report["cached"] and report["separate"], report
        assert not report["point_to_point"] and report["control_backend"] == "gloo", report
        assert report["gloo_channel"] == (True, True), report
    assert reports[1]["raised"] == "RuntimeError: injected"
    assert reports[0]["raised"].startswith("PeerRankError: control test: rank 1 failed at forward step 0"), reports


def test_side_channel_that_cannot_be_made_fails_every_rank_within_the_bound():
    from tests.distributed.hostile_workers import control_group_mismatch_world

    reports = run_world(2, control_group_mismatch_world, TIMEOUT_S, timeout_s=60)
    for report in reports:
        kind, message = report["raised"]
        assert kind == "RankWaitTimeout" and message.startswith(
            "cross-rank checks: the gloo group for the checks of a nccl group was not made by all of its ranks "
            f"within {TIMEOUT_S:g} s"), report
        assert report["elapsed"] < 2 * TIMEOUT_S + 5, report


def test_one_rank_group_makes_no_check_collective():
    from tests.distributed.hostile_workers import one_rank_world

    report, = run_world(1, one_rank_world, timeout_s=60)
    assert report["world_size"] == 1
    assert all(error <= GRADIENT[torch.float64] for error in report["errors"].values()), report
    assert report["raised"] == "injected"


def test_a_peer_that_closed_its_connection_is_named_as_such():
    """gloo's "Connection closed by peer" inside a bounded wait (a rank that exited or gave up first) becomes the
    same kind of error as a wait that ran out, saying what happened, instead of gloo's words alone."""
    from ring_flash_attn.agreement import RankWaitTimeout, wait_bounded

    class ClosedByPeer:
        def wait(self, timeout=None):
            raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                               "[127.0.0.1]:29501")

    with pytest.raises(RankWaitTimeout, match=r"^ring exchange with ranks 1 \(send\): a rank of the group closed its "
                                              r"connection before taking part \(it exited or crashed"):
        wait_bounded([ClosedByPeer()], "ring exchange with ranks 1 (send)")
