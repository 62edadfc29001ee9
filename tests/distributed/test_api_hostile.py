"""The library API under hostile use (issue 25), on 3 CPU ranks in one world: inputs in layouts the fused kernels
do not read as they are, against the float64 oracle."""

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
