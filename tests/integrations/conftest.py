"""The transformers test worlds (2 and 4 CPU ranks), started once per session and read by test_hf.py and
test_zhuzilin_compat.py: each world start costs every rank a transformers import."""

import pytest


@pytest.fixture(scope="session")
def hf_results_by_world():
    pytest.importorskip("transformers", reason="transformers is not installed (pip install .[hf])")
    from tests.distributed.harness import run_world
    from tests.integrations import hf_workers

    return {world_size: run_world(world_size, hf_workers.world_checks, hf_workers.CASES_BY_WORLD[world_size],
                                  hf_workers.SESSION_SEED + 1000 if world_size == hf_workers.MISC_WORLD_SIZE else None)
            for world_size in hf_workers.WORLD_SIZES}
