"""zhuzilin/ring-flash-attention's internals that its clients import (ring_flash_attn.utils,
ring_flash_attn.adapters.hf_adapter), used as the clients use them, at 2 and 4 CPU ranks (the transformers test
worlds of conftest.py; the checks are in zhuzilin_workers.py).

Tolerances: float64 throughout. Attention outputs, LSE and gradients against float64 full attention: 1e-12
(tests/tolerances.py). Models (logits, hidden states, parameter gradients) against the same weights run without
context parallelism, each packed sequence alone, softmax in float64: 1e-10, as in test_hf.py.
"""

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install .[hf])")

from tests.integrations.hf_workers import WORLD_SIZES  # noqa: E402
from tests.tolerances import FORWARD, GRADIENT  # noqa: E402

MODEL_TOL = 1e-10


@pytest.fixture(scope="module")
def api_results(hf_results_by_world):
    return {world_size: [rank_result["zhuzilin_api"] for rank_result in per_rank]
            for world_size, per_rank in hf_results_by_world.items()}


def _check_attention(errors):
    for name in ("out", "lse"):
        assert errors[name] <= FORWARD[torch.float64], errors
    for name in ("dq", "dk", "dv"):
        assert errors[name] <= GRADIENT[torch.float64], errors


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_utils_ring_comm_and_update_out_and_lse_build_a_ring(api_results, world_size):
    for per_rank in api_results[world_size]:
        errors = dict(per_rank["ring_comm"])
        refused = errors.pop("refused")
        _check_attention(errors)
        assert refused["non_contiguous"][0] == "ValueError" and "to_send: expected a contiguous" in refused[
            "non_contiguous"][1]
        assert refused["recv_shape"][0] == "ValueError" and "recv_tensor: expected" in refused["recv_shape"][1]
        assert refused["wait_before_commit"] == ("RuntimeError", "wait called before commit")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_utils_all_gather_comm_and_get_default_args_as_prime_rl(api_results, world_size):
    for per_rank in api_results[world_size]:
        for stride, errors in per_rank["all_gather_comm"].items():
            errors = dict(errors)
            exc_type, message = errors.pop("refused")
            assert exc_type == "ValueError" and "output_tensor: expected" in message, message
            _check_attention(errors)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_data_params_feed_llama3_as_prime_rl(api_results, world_size):
    for per_rank in api_results[world_size]:
        _check_attention(per_rank["data_params"])


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_replaced_create_ring_flash_attention_forward_is_used(api_results, world_size):
    """axolotl replaces it in ring_flash_attn.adapters.hf_adapter before calling substitute_hf_flash_attn."""
    for per_rank in api_results[world_size]:
        got = per_rank["replaced_forward"]
        assert got["replacement_calls"] == 2 and got["heads_k_stride_seen"] == [2], got  # one per layer
        assert got["model"]["logits"] <= MODEL_TOL and got["model"]["grads"] <= MODEL_TOL, got
        exc_type, message = got["mismatched_replacement"]
        assert exc_type == "ValueError" and "create_ring_flash_attention_forward: none of the functions" in message


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_client_flash_attention_forward_reached_through_flash_attention_forward(api_results, world_size):
    """axolotl's batch path: check_params, then its own _flash_attention_forward running ring_flash_attn_func."""
    for per_rank in api_results[world_size]:
        got = per_rank["client_flash_forward"]
        assert got["check_params"] is True and got["check_params_mismatch"] is False, got
        assert got["logits"] <= MODEL_TOL and got["grads"] <= MODEL_TOL, got


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_use_ring_attn_switches_to_transformers_own_and_back(api_results, world_size):
    for per_rank in api_results[world_size]:
        got = per_rank["switched_off"]
        exc_type, message = got["off"]  # transformers' flash attention, absent on this CPU machine
        assert exc_type != "none" and "flash" in message.lower() and "ring" not in message.lower(), got
        assert got["switch_after"] is True


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_non_causal_encoder_through_substitute_hf_flash_attn(api_results, world_size):
    for per_rank in api_results[world_size]:
        for name in ("flash_attention_2", "ring_attention"):
            got = per_rank["encoder"][name]
            assert got["hidden"] <= MODEL_TOL and got["grads"] <= MODEL_TOL, (name, got)
            assert got["key_bias_grads_abs"] <= 1e-12, (name, got)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_model_loaded_with_ring_attention_before_registering(api_results, world_size):
    """Loading with "ring_attention" before register_ring_attention works (importing the integration registers
    the name); a forward before configuring it says what to call; after registering, the ring runs."""
    outcomes = [per_rank["loaded_before_registering"] for per_rank in api_results[world_size]]
    for got in outcomes:
        exc_type, message = got["before"]
        assert exc_type == "RuntimeError", got
        assert "call register_ring_attention(group=..., variant=...) or substitute_hf_flash_attn" in message
        assert got["logits"] <= MODEL_TOL, got
    assert len({got["before"] for got in outcomes}) == 1, "ranks raised different errors"
