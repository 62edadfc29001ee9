"""Drop-in for zhuzilin/ring-flash-attention: its users' imports and calls run unchanged.

Every public name and module path that project documents (its README and ``ring_flash_attn/__init__.py``)
is importable here, and every function, reached through its own module path, gives the float64 oracle's
numbers (out, LSE, gradients) on 2 and 3 CPU ranks.
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch

from tests.distributed.dropin_workers import MODULES, PREFIX, dropin_errors
from tests.distributed.harness import run_world
from tests.tolerances import FORWARD, GRADIENT

SEED = int.from_bytes(os.urandom(4), "little")
WORLD_SIZES = (2, 3)
TOP_LEVEL_HELPERS = ("substitute_hf_flash_attn", "update_ring_flash_attn_params")


@pytest.fixture(scope="module")
def errors_by_world():
    return {p: run_world(p, dropin_errors, SEED) for p in WORLD_SIZES}


def _documented_functions():
    return [(path, f"{PREFIX[variant]}_{suffix}") for path, (variant, suffixes) in MODULES.items()
            for suffix in suffixes]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("path,name", _documented_functions())
def test_every_function_through_its_module_path(errors_by_world, world_size, path, name):
    for rank, errors in enumerate(errors_by_world[world_size]):
        got = errors[f"{path}.{name}"]
        assert got["out"] <= FORWARD[torch.float64], (rank, got)
        assert got["lse"] <= FORWARD[torch.float64], (rank, got)
        assert got["grad"] <= GRADIENT[torch.float64], (rank, got)


def test_prepare_cu_seqlens_at_its_module_path():
    module = importlib.import_module("ring_flash_attn.llama3_flash_attn_varlen")
    cu_seqlens = torch.tensor([0, 3, 8, 12], dtype=torch.int32)
    cu_q, cu_k, max_q, max_k, k_slice = module.llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, True, 1, 2)
    # Rank 1 holds tokens [6, 12): the tail of the sequence [3, 8) and all of [8, 12); its keys start at 3.
    assert cu_q.tolist() == [0, 2, 6] and cu_k.tolist() == [0, 5, 9]
    assert (max_q, max_k, k_slice) == (4, 5, slice(3, 12))


def test_hf_helpers_at_every_documented_path():
    from ring_flash_attn.integrations import hf

    import ring_flash_attn
    import ring_flash_attn.adapters
    import ring_flash_attn.adapters.hf_adapter

    for name in TOP_LEVEL_HELPERS:
        assert getattr(ring_flash_attn, name) is getattr(hf, name)
        assert getattr(ring_flash_attn.adapters, name) is getattr(hf, name)
        assert getattr(ring_flash_attn.adapters.hf_adapter, name) is getattr(hf, name)
        assert name in ring_flash_attn.__all__


def test_import_ring_flash_attn_does_not_import_transformers():
    code = ("import sys, ring_flash_attn, ring_flash_attn.zigzag_ring_flash_attn; "
            "assert 'transformers' not in sys.modules, 'transformers imported'; "
            "from ring_flash_attn import substitute_hf_flash_attn; "
            "assert 'transformers' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
