"""Ring attention on 1-4 CPU ranks against the float64 full-attention oracle.

Each world size is started once (process start-up dominates on CPU) and runs
the whole matrix; every case's inputs are drawn fresh for this test session
and are the same for every world size, so errors can be compared across sizes.
"""

import itertools
import os

import pytest

from tests.distributed.harness import run_world
from tests.distributed.workers import DTYPES, ring_errors
from tests.tolerances import FORWARD, GRADIENT, GROWTH_FLOOR

WORLD_SIZES = (1, 2, 3, 4)
SESSION_SEED = int.from_bytes(os.urandom(4), "little")

# (variant, causal); zigzag is causal-only by design.
SCHEDULES = (("ring", False), ("ring", True), ("zigzag", True))
BACKEND_DTYPES = (("reference", "float64"), ("sdpa", "float64"), ("sdpa", "float32"), ("sdpa", "bfloat16"),
                  ("sdpa", "float16"))
HEADS_K = (4, 2, 1)  # MHA, GQA, MQA with 4 query heads


def _cases():
    cases = []
    for n, ((variant, causal), (backend, dtype), heads_k) in enumerate(
            itertools.product(SCHEDULES, BACKEND_DTYPES, HEADS_K)):
        # seqlen 48 splits into 2P chunks for every P <= 4 (zigzag's need)
        cases.append(dict(variant=variant, causal=causal, backend=backend, dtype=dtype, heads_k=heads_k,
                          batch=2, seqlen=48, heads=4, head_dim=16, seed=SESSION_SEED + n))
    # Masks beyond plain causal: sliding windows (narrower than a rank's slice, so whole ring steps are
    # skipped), soft-capping, stripes, and packed sequences of very different lengths.
    extra = [
        dict(variant="ring", causal=True, window=(5, -1)),
        dict(variant="ring", causal=False, window=(3, 7)),
        dict(variant="zigzag", causal=True, window=(9, -1)),
        dict(variant="stripe", causal=True),
        dict(variant="stripe", causal=True, window=(6, -1)),
        dict(variant="zigzag", causal=True, softcap=2.0, backend="reference"),
        dict(variant="ring", causal=False, softcap=2.0, backend="reference"),
        dict(variant="ring", causal=True, seqlens=(96, 24, 48)),
        dict(variant="ring", causal=False, seqlens=(24, 120)),
        dict(variant="zigzag", causal=True, seqlens=(24, 144, 48)),
        dict(variant="zigzag", causal=True, seqlens=(48, 24), window=(7, -1)),
        dict(variant="stripe", causal=True, seqlens=(72, 24)),
        # zero-length sequences (repeated offsets, as padding makes) and int64 cu_seqlens, as flash-attn takes
        dict(variant="zigzag", causal=True, seqlens=(0, 48, 0, 0, 24, 0), cu_dtype="int64"),
        dict(variant="ring", causal=False, seqlens=(24, 0, 48), window=(5, 3)),
        dict(variant="stripe", causal=True, seqlens=(0, 72), cu_dtype="int64"),
        # many sequences of few lengths: the engine batches their equal-shape calls (ring/batching.py)
        dict(variant="zigzag", causal=True, seqlens=(24,) * 5 + (48,) * 2),
        dict(variant="ring", causal=False, seqlens=(24,) * 4 + (0, 24), window=(5, 3)),
        # ALiBi by true token distance; backend=None checks the automatic choice falls back to one that has it.
        dict(variant="ring", causal=False, alibi=True, backend=None),
        dict(variant="zigzag", causal=True, alibi=True, backend=None),
        dict(variant="stripe", causal=True, alibi=True, window=(9, -1), backend=None),
        dict(variant="zigzag", causal=True, alibi=True, seqlens=(48, 24), backend=None),
        dict(variant="stripe", causal=True, alibi=True, seqlens=(24,) * 4, backend=None),
    ]
    for n, spec in enumerate(extra):
        for backend, dtype, heads_k in (("sdpa", "float64", 2), ("sdpa", "bfloat16", 1)):
            if spec.get("backend", backend) != backend:
                backend = spec["backend"]
            cases.append(dict(dict(backend=backend, dtype=dtype, heads_k=heads_k, batch=1, seqlen=48, heads=4,
                                   head_dim=16, seed=SESSION_SEED + 1000 + 2 * n + (dtype != "float64")), **spec))
    return cases


CASES = _cases()


def _case_id(case):
    tags = [case["variant"], "causal" if case["causal"] else "full", str(case["backend"] or "auto"), case["dtype"],
            f"hk{case['heads_k']}"]
    if "window" in case:
        tags.append("win%d,%d" % tuple(case["window"]))
    if case.get("softcap"):
        tags.append(f"softcap{case['softcap']}")
    if case.get("alibi"):
        tags.append("alibi")
    if "seqlens" in case:
        tags.append("varlen" + "+".join(map(str, case["seqlens"])))
    if "cu_dtype" in case:
        tags.append(case["cu_dtype"])
    return "-".join(tags)


@pytest.fixture(scope="module")
def errors_by_world():
    """{world_size: [per-case dict of the worst error over ranks]}"""
    table = {}
    for world_size in WORLD_SIZES:
        per_rank = run_world(world_size, ring_errors, CASES)
        table[world_size] = [{key: max(rank_errs[i][key] for rank_errs in per_rank) for key in per_rank[0][i]}
                             for i in range(len(CASES))]
    return table


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case_index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_matches_oracle(errors_by_world, world_size, case_index):
    case, errs = CASES[case_index], errors_by_world[world_size][case_index]
    dtype = DTYPES[case["dtype"]]
    for name in ("out", "lse"):
        assert errs[name] <= FORWARD[dtype], f"{name}: rel err {errs[name]:.3g} > {FORWARD[dtype]:.3g} at P={world_size}"
    for name in ("dq", "dk", "dv"):
        assert errs[name] <= GRADIENT[dtype], f"{name}: rel err {errs[name]:.3g} > {GRADIENT[dtype]:.3g} at P={world_size}"


@pytest.mark.parametrize("case_index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_error_does_not_grow_with_world_size(errors_by_world, case_index):
    """The largest world's error stays within 2x the single rank's, beyond the dtype's rounding."""
    dtype = DTYPES[CASES[case_index]["dtype"]]
    one, most = errors_by_world[WORLD_SIZES[0]][case_index], errors_by_world[WORLD_SIZES[-1]][case_index]
    for name in one:
        assert most[name] <= 2 * max(one[name], GROWTH_FLOOR[dtype]), \
            f"{name}: error {most[name]:.3g} at P={WORLD_SIZES[-1]} vs {one[name]:.3g} at P=1"


def test_report_largest_errors(errors_by_world, capsys):
    """Print the largest error per dtype (the figures quoted in release notes); asserts they were measured."""
    worst = {}
    for world_errs in errors_by_world.values():
        for case, errs in zip(CASES, world_errs):
            for name, value in errs.items():
                key = (case["dtype"], name)
                worst[key] = max(worst.get(key, 0.0), value)
    assert len(worst) == len({c["dtype"] for c in CASES}) * 5
    with capsys.disabled():
        print("\nlargest relative errors vs float64 oracle:")
        for (dtype, name), value in sorted(worst.items()):
            print(f"  {dtype:9s} {name:4s} {value:.3g}")
