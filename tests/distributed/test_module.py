"""RingAttention module with its shard/gather helpers, full batch in, full output out."""

import os

import pytest
import torch

from tests.distributed.harness import run_world
from tests.distributed.workers import module_checks
from tests.tolerances import FORWARD, GRADIENT


# (variant, exchange) per world size; the repeatability checks run in the world of 2.
ROUND_TRIPS = {2: [("ring", "ring"), ("zigzag", "allgather")], 3: [("zigzag", "ring"), ("ring", "allgather")],
               4: [("stripe", "ring")]}
SEED = int.from_bytes(os.urandom(4), "little")


@pytest.fixture(scope="module")
def results_by_world():
    return {p: run_world(p, module_checks, cases, SEED, p == 2) for p, cases in ROUND_TRIPS.items()}


@pytest.mark.parametrize("world_size, index", [(p, n) for p, cases in ROUND_TRIPS.items() for n in range(len(cases))],
                         ids=[f"{v}-{e}-{p}" for p, cases in ROUND_TRIPS.items() for v, e in cases])
def test_module_round_trip(results_by_world, world_size, index):
    for errs in (rank_results["round_trips"][index] for rank_results in results_by_world[world_size]):
        assert errs["out"] <= FORWARD[torch.float64], (SEED, errs)
        assert max(errs["dq"], errs["dk"], errs["dv"]) <= GRADIENT[torch.float64], (SEED, errs)


def test_deterministic_and_return_attn_probs(results_by_world):
    for result in (rank_results["repeatability"] for rank_results in results_by_world[2]):
        assert result["bitwise_equal"]
        assert result["probs_is_none"] and result["plain_equals"]
        assert result["lse_shape"] == (1, 4, 16)
