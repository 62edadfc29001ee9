"""A tiny Megatron-Core GPTModel with context parallelism 2 (gloo, CPU ranks) on RingCoreAttention, against
the same weights without context parallelism on Megatron's own DotProductAttention.

One world runs every check. Tolerance: 1e-10 relative (float64 model; Megatron's reference softmax runs in
float64 here, attention_softmax_in_fp32=False).
"""

import os

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install .[megatron])")

from tests.distributed.harness import run_world  # noqa: E402
from tests.integrations import megatron_workers  # noqa: E402

SESSION_SEED = int.from_bytes(os.urandom(3), "little")
CONTEXT_PARALLEL_SIZE = 2
TOLERANCE = 1e-10


@pytest.fixture(scope="module")
def checks():
    return run_world(CONTEXT_PARALLEL_SIZE, megatron_workers.megatron_checks, SESSION_SEED)


@pytest.mark.parametrize("case", ["causal", "sliding_window"])
def test_gpt_loss_and_gradients_match_no_context_parallelism(checks, case):
    for rank_result in checks:
        errors = rank_result[case]
        assert errors["n_params"] >= 10
        assert errors["loss"] <= TOLERANCE and errors["grads"] <= TOLERANCE, errors
    print(f"\nMegatron {case}: largest relative errors {checks[0][case]}")


BAD_INPUTS = {
    "ring_group_not_cp_group": ("ValueError", "must be Megatron's context-parallel group"),
    "cross_attention": ("NotImplementedError", "cross-attention"),
    "arbitrary_mask": ("NotImplementedError", "AttnMaskType.arbitrary"),
    "attention_dropout": ("NotImplementedError", "attention_dropout=0.0"),
    "all_gather_cp": ("ValueError", "cp_comm_type"),
    "packed_seq_params": ("NotImplementedError", "packed sequences"),
    "seqlen_not_split": ("ValueError", "must be even"),
    "head_dim_refused": ("NotImplementedError", "head_dim must be 8, got 16"),
    "good_call_after": ("none", ""),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_on_every_rank(checks, case):
    want_type, want_text = BAD_INPUTS[case]
    outcomes = [rank_result["bad_inputs"][case] for rank_result in checks]
    for exc_type, message in outcomes:
        assert exc_type == want_type and want_text in message, (case, outcomes)
    assert len({exc_type for exc_type, _ in outcomes}) == 1, f"ranks raised different errors: {outcomes}"


def test_version_gate_names_installed_version():
    from ring_flash_attn.integrations._versions import require_version

    with pytest.raises(ImportError, match=r"megatron-core >= 0.15, < 0.17; installed: megatron-core 0.14.0"):
        require_version("megatron-core", "0.14.0", "0.15", "0.17")
