"""Bad input raises a clear error on every rank, before any communication; nothing hangs."""

import re

import pytest

from tests.distributed.harness import run_world
from tests.distributed.workers import bad_input_errors
from tests.tolerances import FORWARD, GRADIENT

import torch

WORLD_SIZE = 3

# What each error message must name: the argument at fault (and for some, what was expected).
EXPECTED = {
    "k seqlen mismatch": (ValueError, r"^k: expected .*seqlen"),
    "v shape mismatch": (ValueError, r"^v: expected the shape of k"),
    "head_dim mismatch": (ValueError, r"^k: expected .*head_dim"),
    "heads_k does not divide": (ValueError, r"^k: the number of K/V heads must divide.*got 3"),
    "dtype mismatch": (TypeError, r"^k, v: expected q's dtype"),
    "integer dtype": (TypeError, r"^q: expected dtype"),
    "3-d input": (ValueError, r"^q: expected 4 dimensions"),
    "zigzag odd local length": (ValueError, r"^seqlen: .*even, got 7"),
    "zigzag non-causal": (ValueError, r"^causal: .*zigzag"),
    "head dim the backend cannot take": (NotImplementedError, r"^backend: .*head_dim must be 64, got 16"),
    "softcap on a backend without it": (NotImplementedError, r"^backend: 'sdpa' cannot serve this call: .*soft-capping"),
    "unknown backend": (ValueError, r"^backend: expected one of"),
    "bad window": (ValueError, r"^window_size: expected values >= -1"),
    "dropout": (NotImplementedError, r"^dropout_p"),
    "alibi on a backend without it": (NotImplementedError, r"^backend: 'sdpa' cannot serve this call: ALiBi"),
    "alibi wrong shape": (ValueError, r"^alibi_slopes: expected shape \(4,\) or \(1, 4\), got \(3,\)"),
    "bad kv packing": (ValueError, r"^kv: expected \[batch, seqlen, 2"),
    "cu_seqlens not integer": (TypeError, r"^cu_seqlens: expected dtype torch.int32 or torch.int64, got torch.float32"),
    "cu_seqlens not from 0": (ValueError, r"^cu_seqlens: expected to start at 0"),
    "cu_seqlens not increasing": (ValueError, r"^cu_seqlens: expected non-decreasing values, got 5 then 3 at index 1"),
    "cu_seqlens not ending at total": (ValueError, r"^cu_seqlens: expected to end at the number of tokens 8, got 6"),
    "cu_seqlens not splittable": (ValueError, r"^cu_seqlens: sequence 0 \(local length 3\) .*zigzag.*even"),
    "max_seqlen too small": (ValueError, r"^max_seqlen: expected at least the longest local sequence \(8\), got 4"),
    "max_seqlen not an int": (TypeError, r"^max_seqlen: expected an int, got NoneType"),
    "llama3 empty batch": (ValueError, r"^cu_seqlens: the packed length 0 must split evenly over 3 ranks, at least"),
    "varlen 4-d input": (ValueError, r"^q: with cu_seqlens expected \[total_tokens, heads, head_dim\]"),
    "heads_k_stride does not divide": (ValueError, r"^heads_k_stride: expected a positive divisor of the K/V heads \(2\), got 3"),
    "llama3 cu_seqlens not splittable": (ValueError, r"^cu_seqlens: the packed length 22 must split evenly over 3"),
    "llama3 bad local_k_slice": (ValueError, r"^local_k_slice: expected a slice within the 24 gathered tokens"),
    "group without this rank": (ValueError, r"^group: this rank is not a member"),
}


@pytest.fixture(scope="module")
def reports():
    return run_world(WORLD_SIZE, bad_input_errors, timeout_s=120)


def test_every_rank_raises_the_expected_error(reports):
    for rank, (report, _) in enumerate(reports):
        names = [name for name, _, _ in report]
        assert len(names) == len(EXPECTED) - (rank != 2)
        for name, exc_type, message in report:
            want_type, pattern = EXPECTED[name]
            assert exc_type == want_type.__name__, f"rank {rank}, {name}: got {exc_type}: {message}"
            assert re.search(pattern, message), f"rank {rank}, {name}: message {message!r} !~ {pattern!r}"


def test_same_message_on_every_rank(reports):
    shared = [{name: msg for name, _, msg in report if name != "group without this rank"} for report, _ in reports]
    assert all(s == shared[0] for s in shared)


def test_ring_still_correct_after_errors(reports):
    """No rank was left inside a collective: a following good call completes and matches the oracle."""
    for _, errs in reports:
        assert errs["out"] <= FORWARD[torch.float64] and errs["lse"] <= FORWARD[torch.float64]
        assert max(errs["dq"], errs["dk"], errs["dv"]) <= GRADIENT[torch.float64]
