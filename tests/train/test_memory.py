"""The memory-lean step on one process: the chunked loss and the tiled MLP against the plain computation in
float64 (loss and every gradient, several transformers families, tied and untied embeddings, ignored labels),
the activation offload's bookkeeping, and the memory plan's choices."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ring_flash_attn.train import memory_plan, offload
from ring_flash_attn.train.activation_checkpoint import checkpoint_wrapper, is_checkpointed
from ring_flash_attn.train.config import ConfigError, load_config
from ring_flash_attn.train.fsdp import decoder_layers
from ring_flash_attn.train.loss import LogitTransform, apply_chunked_loss, chunk_tokens, linear_cross_entropy_sum
from ring_flash_attn.train.tiling import apply_tiling, mlp_bytes_per_token, tile_tokens
from tests.tolerances import rel_err

# float64 sums in another order: a few ulps of the largest term.
F64 = 1e-12
VOCAB = 97


def _reference_loss(hidden, weight, labels, transform):
    logits = transform.apply(hidden.double() @ weight.double().t())
    return F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)


@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(scale=0.125), LogitTransform(softcap=2.5),
                                       LogitTransform(scale=3.0, softcap=4.0)], ids=str)
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_loss_equals_cross_entropy_of_the_logits_in_float64(transform, chunk):
    tokens, width = 37, 16
    hidden = torch.randn(tokens, width, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(VOCAB, width, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, VOCAB, (tokens,))
    labels[torch.randperm(tokens)[:9]] = -100
    budget = chunk * VOCAB * (2 * 8 + 8)  # chunk_tokens' own count for float64
    assert chunk_tokens(VOCAB, torch.float64, budget) == chunk
    grad_out = torch.rand((), dtype=torch.float64) + 0.5
    (linear_cross_entropy_sum(hidden, weight, labels, budget_bytes=budget, transform=transform) * grad_out).backward()
    ours = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    expected = _reference_loss(hidden, weight, labels, transform)
    (expected * grad_out).backward()
    loss = linear_cross_entropy_sum(hidden, weight, labels, budget_bytes=budget, transform=transform)
    assert abs(loss.item() - expected.item()) <= F64 * abs(expected.item())
    assert rel_err(ours[0], hidden.grad) <= F64 and rel_err(ours[1], weight.grad) <= F64


def test_chunked_loss_in_bfloat16_under_autocast_is_the_plain_loss():
    """Under autocast the product runs in bf16 as the model's own lm_head would, the softmax in float32: the
    same numbers as cross-entropy over ``lm_head(hidden).float()`` up to the order of float32 sums."""
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = torch.randn(VOCAB, 32, requires_grad=True)
    labels = torch.randint(0, VOCAB, (64,))
    labels[::5] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy_sum(hidden, weight, labels, budget_bytes=10 * VOCAB * 12)
        loss.backward()
        ours = hidden.grad.clone(), weight.grad.clone()
        hidden.grad = weight.grad = None
        plain = F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum")
        plain.backward()
    assert loss.dtype == torch.float32 and rel_err(loss, plain) <= 1e-5
    # the gradients differ by bf16 roundings of differently ordered float32 sums
    assert rel_err(ours[0], hidden.grad) <= 1e-2 and rel_err(ours[1], weight.grad) <= 1e-2


FAMILIES = {  # family -> extra config: each exercises one way a head turns hidden states into logits
    "llama": {"tie_word_embeddings": True},
    "llama-untied": {"tie_word_embeddings": False},
    "gemma2": {"final_logit_softcapping": 5.0, "head_dim": 8},
    "cohere": {"logit_scale": 0.25},
    "granite": {"logits_scaling": 4.0},
    "qwen2": {},
    "mistral": {},
}


def _tiny(family: str, layers: int = 2):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = dict(FAMILIES.get(family, {}))
    config = AutoConfig.for_model(family.split("-")[0], vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                  use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").double()


def _gradients(model):
    return {name.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_model_loss_and_gradients_equal_its_own_logits(family):
    """token_loss_sum with chunks of 3 tokens, MLP tiles of 5 tokens and norm tiles of 12, inside checkpointed
    layers, against cross-entropy over the model's own logits, untiled and unchecked, in float64."""
    model = _tiny(family)
    inputs = torch.randint(3, VOCAB, (2, 21))
    labels = torch.randint(3, VOCAB, (2, 21))
    labels[:, ::4] = -100
    positions = torch.arange(21).expand(2, 21)
    logits = model(input_ids=inputs, position_ids=positions).logits
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    expected.backward()
    reference = _gradients(model)
    model.zero_grad()
    apply_tiling(model, 5 * 4 * 48 * 8 / 2 ** 20)
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        layers[index] = checkpoint_wrapper(layer, preserve_rng_state=False)
    apply_chunked_loss(model, 3 * VOCAB * 24 / 2 ** 20)
    loss = model.token_loss_sum(inputs, labels, positions)
    loss.backward()
    assert abs(loss.item() - expected.item()) <= F64 * expected.item()
    for name, gradient in _gradients(model).items():
        # Gemma's norms compute in float32 whatever their input: their weights' gradients are float32 sums,
        # over tiles here and over the whole sequence there.
        tolerance = 1e-6 if family == "gemma2" and "norm" in name else 1e-11
        assert rel_err(gradient, reference[name]) <= tolerance, (family, name)


def test_tiles_follow_the_budget_and_short_sequences_run_untiled():
    assert tile_tokens(mlp_bytes_per_token(8192, 2), 1 << 30) == 16384
    model = _tiny("llama")
    layer = decoder_layers(model)[0]
    calls = {"mlp": [], "norm": []}
    for name, module in (("mlp", layer.mlp.down_proj), ("norm", layer.post_attention_layernorm)):
        plain = module.forward
        module.forward = lambda x, plain=plain, name=name: calls[name].append(x.shape[:-1].numel()) or plain(x)
    apply_tiling(model, 5 * 4 * 48 * 8 / 2 ** 20)  # MLP tiles of 5 tokens; norm tiles of 12 (32 x 20 bytes each)
    for shape in ((1, 5, 32), (2, 6, 32), (1, 40, 32)):
        hidden = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        layer.mlp(hidden)
        layer.post_attention_layernorm(hidden)
    assert calls["mlp"] == [5, 5, 5, 2] + [5] * 8
    assert calls["norm"] == [5, 12, 12, 12, 12, 4]


def test_offload_moves_each_checkpointed_input_once_and_changes_no_gradient(monkeypatch):
    """The bookkeeping of activation offload (synchronous copies on the CPU): each checkpointed layer's input
    goes to the host once, comes back once in the backward, and the gradients are bitwise those without it."""
    monkeypatch.setattr(offload, "MIN_BYTES", 1)
    model = _tiny("llama", layers=3)
    layers = decoder_layers(model)
    layers[0] = checkpoint_wrapper(layers[0], preserve_rng_state=False)
    layers[2] = checkpoint_wrapper(layers[2], preserve_rng_state=False)
    inputs = torch.randint(3, VOCAB, (1, 40))
    model(input_ids=inputs).logits.square().sum().backward()
    reference = _gradients(model)
    model.zero_grad()
    mover = offload.apply_activation_offload(model, torch.device("cpu"), is_checkpointed)
    fetched = []
    fetch = mover._fetch
    monkeypatch.setattr(mover, "_fetch", lambda copy: fetched.append(copy) or fetch(copy))
    model(input_ids=inputs).logits.square().sum().backward()
    assert mover.moved_bytes == 2 * 40 * 32 * 8  # the inputs of layers 0 and 2, float64
    assert len(fetched) == 2 and fetched[0] is not fetched[1]
    assert all(torch.equal(g, reference[n]) for n, g in _gradients(model).items())


LLAMA_1B = dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, head_dim=64, vocab=128256)


def _settings(**changes):
    base = memory_plan.Settings(seq_len=16384, micro_batch=1, cp=1, shard_ranks=1, compute_bytes=2,
                                loss_chunk_bytes=256 << 20, tile_bytes=1 << 30, activation_checkpointing="auto",
                                checkpoint_every=2, offload_activations=None, cpu_offload=None, accelerator=True)
    return dataclasses.replace(base, **changes)


def _shape():
    from types import SimpleNamespace

    config = SimpleNamespace(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                             head_dim=64, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True)
    return memory_plan.Shape.of(config)


def test_plan_takes_the_leaner_path_only_when_the_step_would_not_fit():
    shape, gib = _shape(), memory_plan.GIB
    assert 1.2e9 < shape.params < 1.3e9  # Llama-3.2-1B
    short = memory_plan.plan_step(shape, _settings(seq_len=2048), 80 * gib)
    assert (short.choices.activation_checkpointing, short.choices.offload_activations) == ("none", False)
    longer = memory_plan.plan_step(shape, _settings(seq_len=65536), 80 * gib)
    assert longer.choices.activation_checkpointing == "full" and longer.fits
    longest = memory_plan.plan_step(shape, _settings(seq_len=1 << 20), 80 * gib)
    assert longest.choices.offload_activations and longest.host_parts["checkpointed layer inputs"] > 0
    cramped = memory_plan.plan_step(shape, _settings(seq_len=4096), 16 * gib)
    assert cramped.choices.cpu_offload and cramped.host_parts["states"] == 16 * shape.params
    # forced settings are kept even where they do not fit, and the plan says so
    forced = memory_plan.plan_step(shape, _settings(seq_len=1 << 20, activation_checkpointing="none",
                                                    offload_activations=False, cpu_offload=False), 80 * gib)
    assert not forced.fits and "does not fit" in forced.describe()[-1]
    # the plan's tokens are this rank's share: cp 8 holds an eighth
    assert memory_plan.plan_step(shape, _settings(seq_len=1 << 20, cp=8), 80 * gib).tokens == 1 << 17


def test_longest_fitting_is_the_edge_of_fitting():
    shape, settings, gib = _shape(), _settings(), memory_plan.GIB
    longest = memory_plan.longest_fitting(shape, settings, 80 * gib, multiple=2)
    assert longest % 2 == 0
    assert memory_plan.plan_step(shape, dataclasses.replace(settings, seq_len=longest), 80 * gib).fits
    assert not memory_plan.plan_step(shape, dataclasses.replace(settings, seq_len=longest + 2), 80 * gib).fits
    assert memory_plan.longest_fitting(shape, settings, 1 << 20) == 0


def test_offload_switches_are_config_errors_on_the_cpu(tmp_path):
    for key in ("train.offload_activations", "parallel.cpu_offload"):
        config = load_config(None, [(key, "true")])
        with pytest.raises(ConfigError, match=key + r": true needs a GPU"):
            memory_plan.check_device_choices(config, "cpu")
        memory_plan.check_device_choices(config, "cuda")
    assert memory_plan.loss_chunk_mib(load_config(None), 80 * memory_plan.GIB) == 1024  # automatic, at most 1 GiB
    assert memory_plan.loss_chunk_mib(load_config(None), 8 * memory_plan.GIB) == 128     # a 64th of the device
    for key, value in (("train.loss_chunk_mib", "0"), ("train.tile_mib", "-1"),
                       ("parallel.device_memory_gib", "0")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [(key, value)])


@pytest.mark.parametrize("family, experts", [("mixtral", {"num_local_experts": 4}),
                                             ("qwen2_moe", {"num_experts": 4, "moe_intermediate_size": 16})])
def test_tiled_mixture_of_experts_equals_the_untiled_layer(family, experts):
    """A mixture of experts routes each token alone, so it tiles too (its experts' kernels run in float32 only:
    float32 rounding of differently batched products is the tolerance)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, vocab_size=VOCAB, hidden_size=32, intermediate_size=48, head_dim=8,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, use_cache=False,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, **experts)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    inputs = torch.randint(3, VOCAB, (2, 23))
    logits = model(input_ids=inputs).logits
    logits.square().sum().backward()
    reference = _gradients(model)
    model.zero_grad()
    apply_tiling(model, 5 * 4 * 48 * 4 / 2 ** 20)  # tiles of a few tokens
    tiled = model(input_ids=inputs).logits
    tiled.square().sum().backward()
    assert rel_err(tiled, logits) <= 1e-6
    for name, gradient in _gradients(model).items():
        assert rel_err(gradient, reference[name]) <= 1e-5, name
