"""Issue 13's hostile cases on Ulysses (4x1) and USP (2x2), four CPU ranks: a kernel fault on one rank or on all,
in the forward or the backward, fails every rank promptly and leaves the mesh serving the next call (float64
oracle); rank 1 alone passing other arguments makes every rank raise naming them (nothing aborts, nothing hangs,
nothing computes silently on disagreeing ranks: causal differed silently before); double backward is refused on
every rank."""

import pytest
import torch

from tests.distributed.harness import run_world
from tests.distributed.ulysses_workers import ulysses_hostile
from tests.tolerances import GRADIENT

TIMEOUT_S = 30.0  # the bounded wait; every failure here must come well before it
MESHES = ("4x1", "2x2")


@pytest.fixture(scope="module")
def reports():
    return run_world(4, ulysses_hostile, TIMEOUT_S, timeout_s=240)


@pytest.mark.parametrize("mesh", MESHES)
def test_kernel_fault_fails_every_rank_promptly_and_the_mesh_serves_the_next_call(reports, mesh):
    for rank, report in enumerate(reports):
        # Two head chunks at least (the fault in the first chunk and in the last), so some all-to-alls follow it.
        assert min(report[mesh]["counts"].values()) >= 2, report[mesh]["counts"]
        # First and last kernel call (of this rank: ranks make different numbers), forward and backward, on rank 1
        # and on every rank.
        assert len(report[mesh]["faults"]) == 8, report[mesh]["faults"]
        for fault in report[mesh]["faults"]:
            phase, index, failing = fault["case"]
            kind, message = fault["raised"]
            if rank in failing:
                assert kind == "InjectedFault" and message == f"injected {phase} fault at kernel call {index}", fault
            else:  # rank 1's own index: ranks make different numbers of kernel calls
                assert kind == "PeerRankError" and f"Ulysses {phase}" in message, fault
                assert f"injected {phase} fault at kernel call" in message, fault
            assert fault["elapsed"] < TIMEOUT_S / 2, fault
            assert fault["clean"] <= GRADIENT[torch.float64], fault


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("what, pattern", [
    ("seqlen", "q shape: expected the same value on every rank of the group, got "),
    ("causal", "causal: expected the same value on every rank of the group, got "),
    ("head_chunks", "head_chunks: expected the same value on every rank of the group, got "),
])
def test_one_rank_with_other_arguments_makes_every_rank_raise_naming_them(reports, mesh, what, pattern):
    for rank, report in enumerate(reports):
        kind, message = report[mesh]["disagreements"][what]
        assert kind in ("RanksDisagreeError", "PeerRankError") and pattern in message, (rank, kind, message)
    # Rank 1 and the ranks that share a group with it in the first round name it directly.
    assert reports[1][mesh]["disagreements"][what][0] == "RanksDisagreeError"


@pytest.mark.parametrize("mesh", MESHES)
def test_one_rank_rejecting_its_arguments_makes_every_rank_raise(reports, mesh):
    kind1, message1 = reports[1][mesh]["disagreements"]["invalid softcap"]
    assert kind1 == "ValueError" and message1.startswith("softcap: expected a finite value >= 0"), message1
    for rank in (0, 2, 3):
        kind, message = reports[rank][mesh]["disagreements"]["invalid softcap"]
        assert kind == "PeerRankError" and "rejected its arguments: ValueError: softcap: expected" in message, message


@pytest.mark.parametrize("mesh", MESHES)
def test_double_backward_is_refused_on_every_rank(reports, mesh):
    for report in reports:
        kind, message = report[mesh]["double"]
        assert kind == "NotImplementedError" and message.startswith("create_graph: double backward through Ulysses")


@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_serves_a_call_after_everything(reports, mesh):
    assert all(report[mesh]["clean"] <= GRADIENT[torch.float64] for report in reports)


def test_once_rank_that_rejects_alone_fails_every_rank_within_the_bound():
    from tests.distributed.ulysses_workers import ulysses_once_lone_rejection

    bound = 3.0
    reports = run_world(2, ulysses_once_lone_rejection, bound, timeout_s=90)
    assert all(error <= GRADIENT[torch.float64] for report in reports for error in report["clean"]), reports
    # A repeated call makes no agreement round, and one failure check per pass (forward, backward).
    assert all(report["repeated_rounds"] == ["Ulysses forward: failure check after the last exchange",
                                             "Ulysses backward: failure check after the last exchange"]
               for report in reports), reports
    (kind0, message0), (kind1, message1) = (report["raised"] for report in reports)
    assert kind0 == "RankWaitTimeout" and message0.startswith("Ulysses all-to-all: not every rank"), message0
    assert kind1 == "ValueError" and message1.startswith("softcap: expected a finite value >= 0"), message1
    assert all(bound <= report["elapsed"] < 2 * bound + 5 for report in reports), [r["elapsed"] for r in reports]
