"""RingAttention module with its shard/gather helpers, full batch in, full output out."""

import os

import pytest
import torch

from tests.distributed.harness import run_world
from tests.distributed.workers import module_round_trip
from tests.tolerances import FORWARD, GRADIENT


@pytest.mark.parametrize("variant, world_size", [("zigzag", 3), ("ring", 2), ("stripe", 4)])
def test_module_round_trip(variant, world_size):
    seed = int.from_bytes(os.urandom(4), "little")
    for errs in run_world(world_size, module_round_trip, variant, seed):
        assert errs["out"] <= FORWARD[torch.float64]
        assert max(errs["dq"], errs["dk"], errs["dv"]) <= GRADIENT[torch.float64]
