"""transformers models with ``attn_implementation`` set to ring attention, on 2 and 4 CPU ranks (gloo).

Each world is started once and runs every model/variant case; models are tiny and random (no download).
Tolerances (relative Frobenius errors, float64 models):
  * vs ``eager_float64`` (transformers' eager attention and masks, softmax in float64): 1e-10, except the
    gradients of Gemma2, whose RMSNorm computes in float32 even in a float64 model; its weight gradients
    sum float32 terms over tokens in a different order on one process and on the ring: 1e-6.
  * vs transformers' ``eager``, which takes its softmax in float32 whatever the dtype: 1e-6.
"""

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install .[hf])")

from tests.integrations import hf_workers  # noqa: E402
from tests.integrations.hf_workers import CASES_BY_WORLD, KINDS, MISC_WORLD_SIZE, WORLD_SIZES  # noqa: E402
from tests.tolerances import FORWARD  # noqa: E402

EXACT_TOL = {"llama": 1e-10, "mistral": 1e-10, "gemma2": 1e-10}
EXACT_GRAD_TOL = {"llama": 1e-10, "mistral": 1e-10, "gemma2": 1e-6}
EAGER_TOL = 1e-6




@pytest.fixture(scope="module")
def results_by_world(hf_results_by_world):  # the session's worlds (conftest.py), shared with test_zhuzilin_compat
    return hf_results_by_world


@pytest.fixture(scope="module")
def model_errors_by_world(results_by_world):
    return {world_size: [rank_result["models"] for rank_result in per_rank]
            for world_size, per_rank in results_by_world.items()}


@pytest.mark.parametrize("world_size, case", [(w, c) for w in WORLD_SIZES for c in CASES_BY_WORLD[w]],
                         ids=[f"{c[0]}-{c[1]}-{w}" for w in WORLD_SIZES for c in CASES_BY_WORLD[w]])
def test_model_matches_single_process(model_errors_by_world, world_size, case):
    kind = case[0]
    per_rank = model_errors_by_world[world_size]
    index = CASES_BY_WORLD[world_size].index(case)
    errors = per_rank[0][index]
    assert errors["n_params"] > 10, "every parameter must have a gradient"
    for rank_errors in per_rank:
        assert rank_errors[index] == errors, "ranks disagree on the gathered results"
    for key in ("logits", "loss", "local_loss"):
        assert errors["exact"][key] <= EXACT_TOL[kind], (key, errors["exact"])
        assert errors["eager"][key] <= EAGER_TOL, (key, errors["eager"])
    for key in ("grads", "local_grads"):
        assert errors["exact"][key] <= EXACT_GRAD_TOL[kind], (key, errors["exact"])
        assert errors["eager"][key] <= EAGER_TOL, (key, errors["eager"])


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("variant", hf_workers.PACKED_VARIANTS)
def test_packed_sequences_match_each_sequence_alone(results_by_world, world_size, variant):
    for rank_result in results_by_world[world_size]:
        errors = dict(rank_result["packed"][variant])
        exc_type, message = errors.pop("gather_without_position_ids")
        assert exc_type == "ValueError" and "pass the full batch's position_ids" in message
        assert max(errors.values()) <= 1e-10, errors


def test_two_rings_side_by_side(results_by_world):
    """World of 4 split into two rings of 2 (data parallelism beside context parallelism)."""
    for rank_result in results_by_world[4]:
        errors = dict(rank_result["two_rings"])
        errors.pop("gather_without_position_ids")
        assert max(errors.values()) <= 1e-10, errors


def test_report_largest_errors(model_errors_by_world, capsys):
    worst = {}
    for world_size, per_rank in model_errors_by_world.items():
        for (kind, _, _), errors in zip(CASES_BY_WORLD[world_size], per_rank[0]):
            for ref in ("exact", "eager"):
                key = (kind, ref)
                worst[key] = max(worst.get(key, 0.0), *errors[ref].values())
    with capsys.disabled():
        print("\nlargest relative errors (logits, losses, gradients):",
              ", ".join(f"{kind} vs {ref}: {err:.2e}" for (kind, ref), err in sorted(worst.items())))
    assert len(worst) == 2 * len(KINDS)


@pytest.fixture(scope="module")
def world_of_two_checks(results_by_world):
    return results_by_world[MISC_WORLD_SIZE]


def test_right_padding_is_exact_on_real_tokens(world_of_two_checks):
    for rank_result in world_of_two_checks:
        for variant, err in rank_result["right_padding"].items():
            assert err <= 1e-10, (variant, err)


def test_bfloat16_autocast(world_of_two_checks):
    """Runs under autocast (q/k/v of mixed dtypes reach the attention); bfloat16 rounding only."""
    for rank_result in world_of_two_checks:
        assert rank_result["autocast_bfloat16"] <= FORWARD[torch.bfloat16], rank_result["autocast_bfloat16"]


BAD_INPUTS = {
    "left_padding": ("NotImplementedError", "left or interior padding"),
    "position_ids_not_from_shard_batch": ("ValueError", "pass position_ids from shard_batch"),
    "forgotten_position_ids": ("ValueError", "pass position_ids from shard_batch"),
    "custom_4d_mask": ("NotImplementedError", "4D mask"),
    "cross_attention": ("NotImplementedError", "cross-attention"),
    "seqlen_not_split": ("ValueError", "multiple of 4"),
    "head_dim_8_served": ("none", ""),
    "head_dim_16_refused": ("NotImplementedError", "head_dim must be 8, got 16"),
    "non_causal_zigzag": ("ValueError", "causal=True"),
    "kv_cache_generation": ("NotImplementedError", "KV cache: got a cached call with 17 keys for 1 queries at "
                                                   "offset 16; generation (model.generate"),
    "model_generate": ("NotImplementedError", "and the forward fills a KV cache: generation (model.generate, or any "
                                              "forward that fills a KV cache for later calls) is not supported under "
                                              "ring attention, which runs one whole sequence split over the ranks of "
                                              "a group (training, scoring). Generate with a regular implementation on "
                                              "the full sequence: model.set_attn_implementation(\"sdpa\")"),
    "model_generate_without_cache": ("ValueError", "(model.generate() ends here too: generation is not supported "
                                                   "under ring attention, use model.set_attn_implementation(\"sdpa\") "
                                                   "for it)"),
    "attention_dropout": ("NotImplementedError", "dropout"),
    "silently_eager_model": ("RuntimeError", "no ring attention ran since shard_batch cut this batch"),
    "gather_after_ring_forward": ("none", ""),
    "second_gather_without_forward": ("RuntimeError", "or since the last gather_logits"),
    "good_call_after": ("none", ""),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_on_every_rank(world_of_two_checks, case):
    want_type, want_text = BAD_INPUTS[case]
    outcomes = [rank_result["bad_inputs"][case] for rank_result in world_of_two_checks]
    for exc_type, message in outcomes:
        assert exc_type == want_type and want_text in message, (case, outcomes)
    assert len({outcome for outcome in outcomes}) == 1, f"ranks raised different errors: {outcomes}"


def test_zhuzilin_helpers(world_of_two_checks):
    for rank_result in world_of_two_checks:
        compat = rank_result["zhuzilin"]
        assert compat["flash_attention_2_substituted"] == "flash_attention_forward"
        for model_name in ("ring_attention", "flash_attention_2"):
            assert compat[model_name]["logits"] <= 1e-10 and compat[model_name]["grads"] <= 1e-10, compat
        exc_type, message = compat["batch_of_two"]
        assert exc_type == "ValueError" and "batch size 1" in message, compat["batch_of_two"]


def test_mask_function_refuses_what_the_ring_cannot_honour():
    """The mask function runs on each rank without communication; it refuses masks beyond causal, sliding
    window and padding, and KV caches."""
    from types import SimpleNamespace

    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

    from ring_flash_attn.integrations.hf import register_ring_attention

    mask = ALL_MASK_ATTENTION_FUNCTIONS[register_ring_attention()]
    plain = dict(kv_length=8, q_length=8, mask_function=causal_mask_function)
    assert mask(2, **plain) is None
    padding = torch.ones(2, 8, dtype=torch.bool)
    assert mask(2, **plain, attention_mask=padding) is None
    padding[1, -2:] = False
    assert mask(2, **plain, attention_mask=padding) is padding

    def bidirectional_block(batch_idx, head_idx, q_idx, kv_idx):
        return causal_mask_function(batch_idx, head_idx, q_idx, kv_idx) | ((q_idx < 4) & (kv_idx < 4))

    cases = {"see a later token": dict(plain, mask_function=bidirectional_block),
             "overlay": dict(plain, use_vmap=True),
             "chunked attention": dict(plain, config=SimpleNamespace(attention_chunk_size=4, is_causal=True)),
             "KV cache": dict(plain, kv_length=12, kv_offset=0, q_offset=4)}
    for text, kwargs in cases.items():
        with pytest.raises(NotImplementedError, match=text):
            mask(2, **kwargs)


def test_version_gate_names_installed_version():
    from ring_flash_attn.integrations._versions import require_version

    require_version("transformers", "4.56.0", "4.56", "6")
    with pytest.raises(ImportError, match=r"transformers >= 4.56, < 6; installed: transformers 4.55.4"):
        require_version("transformers", "4.55.4", "4.56", "6")


def test_importing_the_package_imports_no_integration():
    import subprocess
    import sys

    code = ("import sys, ring_flash_attn, ring_flash_attn.integrations; "
            "print([m for m in ('transformers', 'megatron') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
