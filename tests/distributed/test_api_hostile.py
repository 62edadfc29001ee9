"""The library API under hostile use (issue 25), on 3 CPU ranks in one world: inputs in layouts the fused kernels
do not read as they are, against the float64 oracle; two threads on one process group; the LSE's gradient against
float64 autograd; torch.compile around the attention; arguments that must raise the same clear error on every
rank before any exchange."""

import re

import pytest
import torch

from tests.distributed.api_hostile_workers import NAMES, api_hostile_world
from tests.distributed.harness import run_world
from tests.tolerances import FORWARD, GRADIENT

WORLD_SIZE = 3
ODD_LAYOUT_PATHS = ("ring exchange", "allgather exchange", "ulysses", "zigzag_ring_flash_attn_func", "zigzag varlen",
                    "llama3 varlen")


@pytest.fixture(scope="module")
def world():
    return run_world(WORLD_SIZE, api_hostile_world, timeout_s=120)


@pytest.mark.parametrize("path", ODD_LAYOUT_PATHS)
def test_odd_layouts_match_the_oracle(world, path):
    """q and dout strided in head_dim, k at a storage offset heads-major, v expanded over head_dim (stride 0):
    the fused CPU op read them as if contiguous (issue 25: ~100 % wrong outputs and gradients, no error)."""
    for rank, report in enumerate(world):
        errors = report["odd_layouts"][path]
        assert set(errors) == set(NAMES)
        for name, error in errors.items():
            bound = FORWARD[torch.float64] if name in ("out", "lse") else GRADIENT[torch.float64]
            assert error <= bound, f"rank {rank}, {path}, {name}: relative error {error:.3g}"


def test_two_threads_on_one_group_both_fail_and_the_group_serves_on(world):
    """Issue 25: two threads calling on one group at once both got wrong results on every rank. Now the second
    raises at once on its thread, the first at its end (its transfers may have been paired with the second's on
    some rank), every rank alike, nothing hangs, and the group serves the next call exactly."""
    for rank, report in enumerate(world):
        threads = report["threads"]
        kind, message = threads["second"]
        assert kind == "GroupBusyError", (rank, threads["second"])
        assert re.match(r"group: an attention call from thread 'first' is in flight on the process group of ranks "
                        r"\[0, 1, 2\], and an attention call from thread 'MainThread' entered it too\. Calls on one "
                        r"process group must not overlap", message), message
        kind, message = threads["first"]
        assert kind == "GroupBusyError", (rank, threads["first"])
        assert re.match(r"group: an attention call from thread 'MainThread' entered the process group of ranks "
                        r"\[0, 1, 2\] while an attention call was in flight there", message), message
        assert threads["after"] <= GRADIENT[torch.float64], threads["after"]


def test_threads_on_their_own_groups_and_a_backward_on_a_thread_are_exact(world):
    for report in world:
        threads = report["threads"]
        assert max(threads["own groups"]) <= GRADIENT[torch.float64], threads["own groups"]
        assert threads["backward on a thread"] <= GRADIENT[torch.float64], threads["backward on a thread"]


WINDOW = r"^window_size: expected a pair \(left, right\) of ints >= -1 \(-1 = unbounded\), "
META = (r"^cu_seqlens: expected a tensor holding its values \(on the CPU or q's device\), got one on the meta "
        r"device, which holds none: the lengths are read from it$")
SCALE = r"^softmax_scale: expected a finite number > 0, or None for 1 / sqrt\(head_dim\), got "
# name -> (exception type, pattern of its message): the same on every rank.
BAD_CALLS = {
    "softmax_scale nan": ("ValueError", SCALE + "nan$"),
    "softmax_scale inf": ("ValueError", SCALE + "inf$"),
    "softmax_scale 0, causal": ("ValueError", SCALE + "0.0$"),
    "softmax_scale negative, allgather": ("ValueError", SCALE + "-0.5$"),
    "softmax_scale 0, varlen": ("ValueError", SCALE + "0.0$"),
    "softmax_scale negative, llama3": ("ValueError", SCALE + "-1.0$"),
    "softmax_scale 0, ulysses": ("ValueError", SCALE + "0.0$"),
    "softmax_scale a string": ("TypeError", SCALE + "'0.5' \\(str\\)$"),
    "softmax_scale a bool": ("TypeError", SCALE + "True \\(bool\\)$"),
    "window_size inf": ("ValueError", WINDOW + r"got inf \(float\)$"),
    "window_size a string": ("ValueError", WINDOW + r"got '12' \(str\)$"),
    "window_size a float": ("ValueError", WINDOW + r"got \(2.5, -1\): 2.5 is a float$"),
    "window_size inf in the pair, llama3": ("ValueError", WINDOW + r"got \(inf, -1\): inf is a float$"),
    "window_size a float, ulysses": ("ValueError", WINDOW + r"got \(2.0, 3\): 2.0 is a float$"),
    "RingAttention window_size a string": ("ValueError", WINDOW + r"got '12' \(str\)$"),
    "RingAttention softmax_scale 0": ("ValueError", SCALE + "0.0$"),
    "cu_seqlens on meta, varlen": ("ValueError", META),
    "cu_seqlens on meta, ring_attention": ("ValueError", META),
    "cu_seqlens on meta, llama3 prepare": ("ValueError", META),
    "cu_seqlens on meta, ulysses": ("ValueError", META),
    "q, k, v on meta": ("ValueError", r"^q: expected a tensor holding its values, got one on the meta device"),
    "under torch.func.vmap": ("NotImplementedError", r"^q: ring attention cannot run under torch.func transforms"),
    "causal a string": ("TypeError", r"^causal: expected a bool, got 'False' \(str\)$"),
    "causal None, llama3": ("TypeError", r"^causal: expected a bool, got None \(NoneType\)$"),
    "causal a string, ulysses": ("TypeError", r"^causal: expected a bool, got 'True' \(str\)$"),
    "RingAttention causal a string": ("TypeError", r"^causal: expected a bool, got 'yes' \(str\)$"),
    "softcap a string": ("TypeError", r"^softcap: expected a finite number >= 0 \(0 = off\), got '5' \(str\)$"),
    "group a list of ranks": ("TypeError", r"^group: expected a torch.distributed.ProcessGroup or None \(the default "
                                           r"group\), got list; make one with torch.distributed.new_group\(ranks\)$"),
    "group a list of ranks, ulysses": ("TypeError", r"^group: expected a torch.distributed.ProcessGroup or None"),
    "alibi_slopes requiring a gradient": (
        "NotImplementedError", r"^alibi_slopes: their gradient is not computed \(as in flash-attn\).*pass "
                               r"alibi_slopes.detach\(\)$"),
    "shard_sequence rank = world_size": (
        "ValueError", r"^rank: expected an int with 0 <= rank < world_size \(3\), got 3; over a subgroup pass the "
                      r"rank within it \(torch.distributed.get_rank\(group\)\), not the global rank$"),
    "shard_sequence negative rank": ("ValueError", r"^rank: expected an int with 0 <= rank < world_size \(3\), got -1"),
    "shard_sequence world_size 0": ("ValueError", r"^world_size: expected an int >= 1 .*, got 0$"),
    "shard_sequence rank a float": ("ValueError", r"^rank: expected an int .*, got 1.0;"),
    "shard_sequence dim out of range": (
        "ValueError", r"^dim: expected an int indexing the 4 dimensions of x \(the sequence dimension\), got 4$"),
    "unshard_sequence no shards": ("ValueError", r"^shards: expected every rank's slice \(tensors, in rank order\), "
                                                 r"got \[\]$"),
    "unshard_sequence shapes differ": ("ValueError", r"^shards: expected slices of one shape, got \[\(1, 12, 2, 8\), "
                                                     r"\(1, 2, 2, 8\)\]$"),
    "gather_sequence dim out of range": ("ValueError", r"^dim: expected an int indexing the 4 dimensions of x_local"),
    "gather_sequence 1-d slice": ("ValueError", r"^x_local: expected a tensor with at least 2 dimension\(s\), "
                                                r"got shape \(8,\)$"),
    "gather_sequence bad variant": ("ValueError", r"^variant: expected one of \['ring', 'stripe', 'zigzag'\], "
                                                  r"got 'zig-zag'$"),
    "RingAttention.shard dim out of range": ("ValueError", r"^dim: expected an int indexing the 4 dimensions of x"),
    "RingAttention.gather dim out of range": ("ValueError",
                                              r"^dim: expected an int indexing the 4 dimensions of x_local"),
}


@pytest.mark.parametrize("name", BAD_CALLS)
def test_bad_call_raises_the_same_clear_error_on_every_rank(world, name):
    want_kind, pattern = BAD_CALLS[name]
    outcomes = [report["bad_calls"][0][name] for report in world]
    for rank, (kind, message) in enumerate(outcomes):
        assert kind == want_kind and re.search(pattern, message), f"rank {rank}: {kind}: {message}"
    assert len(set(outcomes)) == 1, outcomes


def test_a_bad_argument_on_one_rank_raises_on_every_rank(world):
    """gather_sequence communicates: rank 0's bad dim is its ValueError, and the others hear of it."""
    outcomes = [report["bad_calls"][0]["gather_sequence dim out of range on rank 0 alone"] for report in world]
    assert outcomes[0][0] == "ValueError" and outcomes[0][1].startswith("dim: expected an int indexing"), outcomes
    for kind, message in outcomes[1:]:
        assert kind == "PeerRankError" and message.startswith("rank 0 rejected its arguments: ValueError: dim: "
                                                               "expected an int indexing"), (kind, message)


def test_bad_calls_cover_the_table_and_the_group_serves_on(world):
    for report in world:
        names, clean = report["bad_calls"]
        assert set(names) == set(BAD_CALLS) | {"gather_sequence dim out of range on rank 0 alone"}
        assert clean <= GRADIENT[torch.float64], clean


LSE_GRADIENT_CASES = ("ring", "ring, the LSE alone", "ring, bfloat16", "ring, ALiBi", "allgather",
                      "zigzag_ring_flash_attn_func", "ulysses", "ulysses, the LSE alone", "zigzag varlen",
                      "llama3 varlen")


@pytest.mark.parametrize("case", LSE_GRADIENT_CASES)
def test_lse_gradient_matches_float64_autograd(world, case):
    """Issue 25: the LSE carried no gradient, so a loss with it (``out + lse``) silently lost that term. Now the
    gradients of sum(out * dout) + sum(lse * w) (or of the LSE's term alone) match float64 autograd through
    full attention."""
    dtype = torch.bfloat16 if "bfloat16" in case else torch.float64
    for rank, report in enumerate(world):
        errors = report["lse_gradient"][case]
        for name, error in errors.items():
            bound = FORWARD[dtype] if name in ("out", "lse") else GRADIENT[dtype]
            if case.endswith("the LSE alone") and name == "dv":
                assert error == 0.0, (rank, case, error)  # the LSE does not depend on v
                continue
            assert error <= bound, f"rank {rank}, {case}, {name}: relative error {error:.3g}"


def test_lse_gradient_on_one_rank_alone_raises_on_every_rank(world):
    """Whether the LSE has a gradient decides the backward's transfers, so the ranks agree on it first."""
    for rank, report in enumerate(world):
        (kind, message), clean = report["lse_gradient_on_one_rank"]
        assert kind == "RanksDisagreeError", (rank, kind, message)
        assert message == ("LSE gradient: expected the same value on every rank of the group, got rank 0: True, "
                           "rank 1: False, rank 2: False"), message
        assert clean <= GRADIENT[torch.float64], clean


def test_torch_compile_fullgraph_says_what_cannot_be_captured_and_fullgraph_false_is_exact(world):
    """Issue 25: fullgraph=True stopped on a data-dependent guard deep in the planner, naming nothing useful, and
    fullgraph=False traced the planner's host-side decisions. Now the attention runs eagerly between graphs."""
    from ring_flash_attn.tracing import REASON

    for rank, report in enumerate(world):
        compiled = report["compiled"]
        for case in ("fullgraph function", "fullgraph module"):
            kind, message = compiled[case]
            assert kind == "Unsupported" and REASON in message, (rank, case, kind, message[:300])
        assert compiled["between graphs"] <= GRADIENT[torch.float64], compiled["between graphs"]
