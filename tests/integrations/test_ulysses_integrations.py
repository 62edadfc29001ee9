"""USP (ulysses 2 x ring 2) through transformers and Megatron-Core on 4 CPU ranks, one world for both.

Tolerances as in test_hf.py / test_megatron.py against their float64 references: 1e-10 relative, except the
gradients of Gemma 2, whose RMSNorm computes in float32 even in a float64 model: 1e-6.
"""

import os

import pytest

pytest.importorskip("transformers", reason="transformers is not installed (pip install .[hf])")
pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install .[megatron])")

from tests.distributed.harness import run_world  # noqa: E402
from tests.integrations import ulysses_workers  # noqa: E402

SESSION_SEED = int.from_bytes(os.urandom(3), "little")
TOLERANCE = 1e-10
GEMMA2_GRAD_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def checks():
    return run_world(4, ulysses_workers.usp_integration_checks, SESSION_SEED, timeout_s=240)


@pytest.mark.parametrize("case", [f"{kind}-{variant}" for kind, variant in ulysses_workers.HF_CASES]
                         + ["mistral-zigzag-packed"])
def test_hf_model_on_usp_matches_single_process(checks, case):
    errors = checks[0]["hf"][case]
    assert errors["n_params"] > 10
    for rank_result in checks:
        assert rank_result["hf"][case] == errors, "ranks disagree on the gathered results"
    grad_tolerance = GEMMA2_GRAD_TOLERANCE if case.startswith("gemma2") else TOLERANCE
    assert errors["logits"] <= TOLERANCE and errors["loss"] <= TOLERANCE, errors
    assert errors["grads"] <= grad_tolerance, errors
    print(f"\nHF {case} on USP 2x2: {errors}")


def test_megatron_a2a_p2p_matches_no_context_parallelism(checks):
    for rank_result in checks:
        errors, _ = rank_result["megatron"]
        assert errors["mesh"] == (2, 2) and errors["n_params"] >= 10
        assert errors["loss"] <= TOLERANCE and errors["grads"] <= TOLERANCE, errors
    print(f"\nMegatron a2a+p2p 2x2: {checks[0]['megatron'][0]}")


BAD_INPUTS = {
    "a2a+p2p without sizes": ("ValueError", "config.hierarchical_context_parallel_sizes: cp_comm_type 'a2a+p2p'"),
    "ulysses_size against a2a": ("ValueError", "implies a Ulysses degree of 4, got ulysses_size=2"),
    "ulysses_size not dividing heads": ("ValueError", "Ulysses degree 4 must divide the attention heads"),
    "ulysses_size not positive": ("ValueError", "ulysses_size: expected a positive int, got 0"),
    "a2a good": ("none", ""),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_megatron_bad_ulysses_arguments_raise_on_every_rank(checks, case):
    want_type, want_text = BAD_INPUTS[case]
    outcomes = [rank_result["megatron"][1][case] for rank_result in checks]
    for exc_type, message in outcomes:
        assert exc_type == want_type and want_text in message, (case, outcomes)
