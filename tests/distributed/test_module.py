"""RingAttention module with its shard/gather helpers, full batch in, full output out."""

import os

import pytest
import torch

from tests.distributed.harness import run_world
from tests.distributed.workers import module_round_trip, repeatability
from tests.tolerances import FORWARD, GRADIENT


@pytest.mark.parametrize("variant, exchange, world_size", [("zigzag", "ring", 3), ("ring", "ring", 2),
                                                           ("stripe", "ring", 4), ("zigzag", "allgather", 2),
                                                           ("ring", "allgather", 3)])
def test_module_round_trip(variant, exchange, world_size):
    seed = int.from_bytes(os.urandom(4), "little")
    for errs in run_world(world_size, module_round_trip, variant, seed, exchange):
        assert errs["out"] <= FORWARD[torch.float64]
        assert max(errs["dq"], errs["dk"], errs["dv"]) <= GRADIENT[torch.float64]


def test_deterministic_and_return_attn_probs():
    seed = int.from_bytes(os.urandom(4), "little")
    for result in run_world(2, repeatability, seed):
        assert result["bitwise_equal"]
        assert result["probs_is_none"] and result["plain_equals"]
        assert result["lse_shape"] == (1, 4, 16)
