"""Ulysses and USP on 4 CPU ranks against the float64 full-attention oracle.

One world of 4 ranks runs every mesh (ulysses x ring: 4x1, 2x2, and 2x1, 1x2 on two pairs of ranks, and
1x1 on each rank alone for the world-size-1 error) over the whole case matrix, then the module round trip
and the bad inputs, in one process group (process start-up dominates on the CPU).
"""

import itertools
import os
import re

import pytest

from tests.distributed.harness import run_world
from tests.distributed.ulysses_workers import MESHES, ulysses_checks
from tests.distributed.workers import DTYPES
from tests.tolerances import FORWARD, GRADIENT, GROWTH_FLOOR

SESSION_SEED = int.from_bytes(os.urandom(4), "little")

SCHEDULES = (("ring", False), ("ring", True), ("zigzag", True), ("stripe", True))
HEADS_K = (4, 2, 1)  # MHA; GQA with fewer K/V heads than the Ulysses degree 4 (repeated twice); MQA


def _cases():
    # seqlen 48 splits into 2P chunks for P in (1, 2, 4); 4 query heads split over U in (1, 2, 4).
    base = dict(batch=2, seqlen=48, heads=4, head_dim=8, backend="sdpa")
    cases = [dict(base, variant=variant, causal=causal, heads_k=heads_k, dtype="float64")
             for (variant, causal), heads_k in itertools.product(SCHEDULES, HEADS_K)]
    cases += [dict(base, variant=variant, causal=causal, heads_k=2, dtype=dtype)
              for (variant, causal), dtype in itertools.product(SCHEDULES[1:3], ("float32", "bfloat16", "float16"))]
    extra = [
        dict(variant="ring", causal=True, window=(5, -1)),
        dict(variant="ring", causal=False, window=(3, 7)),
        dict(variant="zigzag", causal=True, window=(9, -1)),
        dict(variant="stripe", causal=True, window=(6, -1), heads_k=1),
        dict(variant="zigzag", causal=True, softcap=2.0, backend="reference"),
        dict(variant="ring", causal=False, alibi=True, backend=None),
        dict(variant="zigzag", causal=True, alibi=True, backend=None, heads_k=4),  # 2 head chunks at U=2
        dict(variant="ring", causal=True, seqlens=(16, 24, 8)),
        dict(variant="ring", causal=False, seqlens=(8, 40)),
        dict(variant="zigzag", causal=True, seqlens=(24, 8, 16), heads_k=1),
        dict(variant="zigzag", causal=True, seqlens=(16, 32), window=(7, -1)),
        dict(variant="stripe", causal=True, seqlens=(40, 8)),
    ]
    cases += [dict(dict(base, batch=1, heads_k=2, dtype="float64"), **spec) for spec in extra]
    # More heads: 4 K/V heads per rank at U=2 (the default 4 head chunks), 2 at U=4.
    cases += [dict(base, variant="ring", causal=True, heads=8, heads_k=8, dtype="float64"),
              dict(base, variant="zigzag", causal=True, heads=8, heads_k=4, dtype="float32", window=(11, -1))]
    return [dict(case, seed=SESSION_SEED + n) for n, case in enumerate(cases)]


CASES = _cases()


def _case_id(case):
    tags = [case["variant"], "causal" if case["causal"] else "full", str(case["backend"] or "auto"), case["dtype"],
            f"hk{case['heads_k']}"]
    tags += ["win%d,%d" % tuple(case["window"])] if "window" in case else []
    tags += [f"softcap{case['softcap']}"] if case.get("softcap") else []
    tags += ["alibi"] if case.get("alibi") else []
    tags += ["varlen" + "+".join(map(str, case["seqlens"]))] if "seqlens" in case else []
    return "-".join(tags)


@pytest.fixture(scope="module")
def results():
    return run_world(4, ulysses_checks, CASES, SESSION_SEED, timeout_s=240)


def _worst(results, mesh, index):
    per_rank = [r["errors"][mesh][index] for r in results]
    return {key: max(errs[key] for errs in per_rank) for key in per_rank[0]}


@pytest.mark.parametrize("mesh", MESHES[1:])
@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_matches_oracle_and_world_size_one(results, mesh, index):
    """Out, LSE and gradients within the dtype's tolerance, and within 2x the error of one rank alone."""
    dtype = DTYPES[CASES[index]["dtype"]]
    errs, one = _worst(results, mesh, index), _worst(results, "1x1", index)
    for name, value in errs.items():
        bound = (FORWARD if name in ("out", "lse") else GRADIENT)[dtype]
        assert value <= bound, f"{name}: rel err {value:.3g} > {bound:.3g} on the {mesh} mesh"
        assert value <= 2 * max(one[name], GROWTH_FLOOR[dtype]), \
            f"{name}: error {value:.3g} on the {mesh} mesh vs {one[name]:.3g} on one rank"


def test_module_round_trip(results):
    for rank_result in results:
        errs = dict(rank_result["module"])
        assert "ulysses_size=2" in errs.pop("repr")
        assert max(errs.values()) <= GRADIENT[DTYPES["float64"]], errs


EXPECTED = {
    "heads not divisible by U": (ValueError, r"^q: the number of query heads must be divisible by the Ulysses "
                                             r"degree 2 .*got 3$"),
    "heads not divisible by U=4": (ValueError, r"^q: .*Ulysses degree 4 .*got 6$"),
    "k shape mismatch": (ValueError, r"^k: expected .*seqlen"),
    "zigzag odd local length": (ValueError, r"^seqlen: .*even, got 3"),
    "zigzag non-causal": (ValueError, r"^causal: .*zigzag"),
    "softcap on sdpa": (NotImplementedError, r"^backend: 'sdpa' cannot serve this call: .*soft-capping"),
    "cu_seqlens not integer": (TypeError, r"^cu_seqlens: expected dtype torch.int32 or torch.int64"),
    "cu_seqlens not splittable": (ValueError, r"^cu_seqlens: sequence 0 \(local length 3\) .*zigzag.*even"),
    "alibi wrong shape": (ValueError, r"^alibi_slopes: expected shape \(4,\) or \(1, 4\), got \(3,\)"),
    "ulysses_size does not divide": (ValueError, r"^ulysses_size: must divide the context-parallel group size 4 "
                                                 r".*got 3"),
    "ulysses_size not positive": (ValueError, r"^ulysses_size: expected a positive int, got 0"),
    "groups not a mesh": (ValueError, r"^ulysses_group, ring_group: expected one row and one column"),
    "module ulysses with allgather": (ValueError, r"^exchange: with ulysses_size=2 .*expected 'ring'"),
    "module ulysses_size does not divide the group": (ValueError, r"^ulysses_size: must divide .* size 2 .*got 4"),
    "head_chunks not dividing": (ValueError, r"^head_chunks: expected a positive divisor of the K/V heads each "
                                             r"Ulysses rank receives \(1\), got 2"),
    "error mid-pipeline": (RuntimeError, r"^kernel failed mid-pipeline$"),
}


def test_bad_inputs_raise_alike_on_every_rank(results):
    reports = [r["bad_inputs"] for r in results]
    assert all(report == reports[0] for report in reports), "ranks raised different errors"
    assert [name for name, _, _ in reports[0]] == list(EXPECTED)
    for name, exc_type, message in reports[0]:
        want_type, pattern = EXPECTED[name]
        assert exc_type == want_type.__name__, f"{name}: got {exc_type}: {message}"
        assert re.search(pattern, message), f"{name}: message {message!r} !~ {pattern!r}"
    for rank_result in results:  # nothing was left in flight: good calls afterwards still match
        for errs in rank_result["after"]:
            assert max(errs.values()) <= GRADIENT[DTYPES["float64"]], errs


def test_head_chunks_do_not_change_results(results):
    """1, 2 and 4 head chunks on the 2x2 mesh agree to float64 rounding (not bitwise: a kernel's rounding depends
    on how many heads one call holds)."""
    differences = [r["head_chunk_difference"] for r in results]
    assert max(differences) <= 1e-14, differences


def test_mesh_groups_take_the_first_calls_timeout(results):
    assert all(r["mesh_timeouts_s"] == [123.0, 123.0] for r in results), [r["mesh_timeouts_s"] for r in results]


def test_report_largest_errors(results, capsys):
    """Print the largest error per mesh and dtype (quoted in the notes); asserts every mesh was measured."""
    worst = {}
    for mesh in MESHES:
        for index, case in enumerate(CASES):
            for name, value in _worst(results, mesh, index).items():
                key = (mesh, case["dtype"])
                worst[key] = max(worst.get(key, 0.0), value)
    assert len(worst) == len(MESHES) * len({c["dtype"] for c in CASES})
    with capsys.disabled():
        print("\nUlysses/USP largest relative errors vs float64 oracle (out, lse, grads):")
        for (mesh, dtype), value in sorted(worst.items()):
            print(f"  {mesh} {dtype:9s} {value:.3g}")
