"""Functions that run on every rank of a transformers test world (module level, so spawn can pickle them).

Every model is tiny, random-initialised from a config (no download) and runs in float64. Two references run
the same weights on one process: transformers' own ``"eager"`` attention, which computes its softmax in
float32 whatever the model's dtype (so it agrees with float64 ring attention to ~1e-7 only), and
``"eager_float64"``: the same dense attention on transformers' own eager masks with the softmax kept in
float64 (registered below, test-only), against which the ring must agree to float64 rounding.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.integrations.common import outcome_of, register_head_dim_8_backend
from tests.tolerances import rel_err

SEQLEN = 32  # splits into 2P equal chunks for P in (1, 2, 4): zigzag's need
BATCH = 2
VOCAB = 64

# The worlds every transformers test reads (started once per session: conftest.py).
SESSION_SEED = int.from_bytes(os.urandom(3), "little")
KINDS = ("llama", "mistral", "gemma2")  # MHA; GQA + sliding window; GQA + alternating windows + soft-capping
VARIANTS = ("zigzag", "ring")
WORLD_SIZES = (2, 4)
CASES = [(kind, variant, SESSION_SEED + 10 * n) for n, (kind, variant) in
         enumerate((k, v) for k in KINDS for v in VARIANTS)]
MISC_WORLD_SIZE = 2  # bad inputs, right padding and the replaced project's helpers run in this world too
# Every model and variant at 2 ranks; at 4 (more ring steps, the same integration code) one case per model,
# both variants among them: 4 processes on the CI's 2 cores are the suite's slowest world.
CASES_BY_WORLD = {2: CASES, 4: [c for c in CASES if (c[0], c[1]) in {("llama", "zigzag"), ("mistral", "ring"),
                                                                     ("gemma2", "zigzag")}]}


def tiny_config(kind: str, **overrides):
    """A 2-layer config of ``kind``; GQA and sliding windows small enough to cross shard boundaries."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=4 * SEQLEN, attention_dropout=0.0,
                  pad_token_id=0, use_cache=False, **overrides)
    if kind == "llama":
        return transformers.LlamaConfig(num_key_value_heads=4, **common)
    if kind == "mistral":  # GQA, every layer a sliding window of 5 tokens
        return transformers.MistralConfig(num_key_value_heads=2, sliding_window=5, **common)
    if kind == "gemma2":  # GQA, alternating sliding (6) / full layers, logit soft-capping, custom query scaling
        return transformers.Gemma2Config(num_key_value_heads=1, head_dim=8, sliding_window=6,
                                         attn_logit_softcapping=2.0, final_logit_softcapping=5.0,
                                         query_pre_attn_scalar=10, **common)
    raise ValueError(kind)


EXACT_EAGER = "eager_float64"


def eager_float64_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
                            **kwargs):
    """transformers' eager attention (additive mask from its eager mask function, GQA by repeating K/V,
    soft-capping) with the softmax in the inputs' dtype instead of float32."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(2, 3) * (module.head_dim ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask
    return (scores.softmax(dim=-1) @ value).transpose(1, 2).contiguous(), None


def register_exact_eager() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(EXACT_EAGER, eager_float64_attention)
    AttentionMaskInterface.register(EXACT_EAGER, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def make_models(kind: str, seed: int, *implementations: str, **overrides):
    """The same random weights once per attention implementation."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides), attn_implementation="eager",
                                            dtype=torch.float64)
    models = []
    for implementation in implementations:
        model = copy.deepcopy(base)
        model.set_attn_implementation(implementation)
        models.append(model)
    return models


def reference_run(model, input_ids, labels, attention_mask=None):
    """Logits, mean next-token loss and gradients of ``model`` on the full batch."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    return logits.detach(), loss.detach(), grads_of(model)


def make_batch(seed: int, batch: int = BATCH, seqlen: int = SEQLEN):
    """Random tokens and their next-token labels, already shifted (-100 for the last token)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (batch, seqlen), generator=g)
    labels = torch.cat([input_ids[:, 1:], torch.full((batch, 1), -100)], dim=1)
    return input_ids, labels


PACKED_VARIANTS = ("zigzag", "ring", "stripe")
PACKED_LENGTHS = ((8, 16, 8), (24, 8))  # per row; every length splits into 2P equal chunks for P in (1, 2, 4)


def make_packed_batch(seed: int, lengths_per_row=PACKED_LENGTHS):
    """Rows of packed sequences: tokens, position ids restarting at 0 per sequence, labels shifted within each
    sequence (-100 at each sequence's last token)."""
    g = torch.Generator().manual_seed(seed)
    rows = [sum(lengths) for lengths in lengths_per_row]
    assert len(set(rows)) == 1
    input_ids = torch.randint(1, VOCAB, (len(lengths_per_row), rows[0]), generator=g)
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in lengths_per_row])
    labels = torch.roll(input_ids, -1, dims=1)
    labels[torch.roll(position_ids, -1, dims=1) == 0] = -100
    return input_ids, position_ids, labels


def packed_reference_run(model, input_ids, labels, lengths_per_row=PACKED_LENGTHS):
    """Logits, mean loss and gradients with every packed sequence run on its own."""
    rows = []
    for row, lengths in enumerate(lengths_per_row):
        bounds = [sum(lengths[:n]) for n in range(len(lengths) + 1)]
        rows.append(torch.cat([model(input_ids=input_ids[row:row + 1, a:b]).logits
                               for a, b in zip(bounds, bounds[1:])], dim=1))
    logits = torch.cat(rows)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    return logits.detach(), loss.detach(), grads_of(model)


def packed_errors(rank, world_size, variant, seed, group=None):
    """Packed rows through shard_batch/gather_logits (Mistral: GQA, sliding window) against every sequence
    run on its own by the exact reference, on the ring of ``group`` (default: all ranks)."""
    from ring_flash_attn.integrations.hf import gather_logits, register_ring_attention, shard_batch

    ring_size = dist.get_world_size(group)
    name = register_ring_attention(group=group, variant=variant)
    exact, ring = make_models("mistral", seed, EXACT_EAGER, name)
    input_ids, position_ids, labels = make_packed_batch(seed + 1)
    ref_logits, ref_loss, ref_grads = packed_reference_run(exact, input_ids, labels)
    local = shard_batch(input_ids, labels, position_ids, variant=variant, group=group)
    logits_local = ring(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits
    logits = gather_logits(logits_local, variant=variant, group=group, position_ids=position_ids)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    return {"logits": rel_err(logits, ref_logits), "loss": rel_err(loss, ref_loss),
            "grads": worst_grad_error(reduce_grads(ring, average_over=ring_size, group=group), ref_grads),
            "gather_without_position_ids": outcome_of(
                lambda: gather_logits(logits_local, variant=variant, group=group))}


def two_rings_errors(rank, world_size, seed):
    """Two rings of half the world each (ranks [0, P/2) and [P/2, P)), as with data parallelism beside
    context parallelism: the packed check on each ring."""
    half = world_size // 2
    rings = [dist.new_group(list(range(half))), dist.new_group(list(range(half, world_size)))]
    return packed_errors(rank, world_size, "zigzag", seed, group=rings[rank // half])


def grads_of(model) -> dict:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def reduce_grads(model, average_over: int, group=None) -> dict:
    grads = grads_of(model)
    for g in grads.values():
        dist.all_reduce(g, group=group)
        g.div_(average_over)
    return grads


def worst_grad_error(grads: dict, reference: dict) -> float:
    assert grads.keys() == reference.keys(), sorted(set(grads) ^ set(reference))
    return max(rel_err(grads[name], reference[name]) for name in reference)


def model_errors(rank, world_size, cases):
    """For each (model kind, variant, seed): relative errors of logits, loss and every parameter's gradient,
    ring vs each reference, through both loss styles: the loss of the gathered logits, and the sum of the
    local losses over the global target count."""
    from ring_flash_attn.integrations.hf import gather_logits, register_ring_attention, shard_batch

    register_exact_eager()
    results = []
    for kind, variant, seed in cases:
        name = register_ring_attention(variant=variant)
        exact, eager, ring = make_models(kind, seed, EXACT_EAGER, "eager", name)
        input_ids, labels = make_batch(seed + 1)
        references = {"exact": reference_run(exact, input_ids, labels), "eager": reference_run(eager, input_ids, labels)}

        local = shard_batch(input_ids, labels, variant=variant)
        logits_local = ring(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits
        logits = gather_logits(logits_local, variant=variant)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        gathered_grads = reduce_grads(ring, average_over=world_size)

        ring.zero_grad(set_to_none=True)
        n_targets = int((labels != -100).sum())
        logits_local = ring(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits
        local_loss_sum = F.cross_entropy(logits_local.flatten(0, 1), local["labels"].flatten(), reduction="sum")
        (local_loss_sum / n_targets).backward()
        summed = local_loss_sum.detach().clone()
        dist.all_reduce(summed)
        local_grads = reduce_grads(ring, average_over=1)

        errors = {"n_params": len(gathered_grads)}
        for ref_name, (ref_logits, ref_loss, ref_grads) in references.items():
            errors[ref_name] = {
                "logits": rel_err(logits, ref_logits),
                "loss": rel_err(loss, ref_loss),
                "grads": worst_grad_error(gathered_grads, ref_grads),
                "local_loss": rel_err(summed / n_targets, ref_loss),
                "local_grads": worst_grad_error(local_grads, ref_grads),
            }
        results.append(errors)
    return results


def right_padding_error(rank, world_size, variant, seed):
    """Right-padded rows: the logits of the real tokens match eager with the same padding mask."""
    from ring_flash_attn.integrations.hf import gather_logits, register_ring_attention, shard_batch

    register_exact_eager()
    name = register_ring_attention(variant=variant)
    exact, ring = make_models("mistral", seed, EXACT_EAGER, name)
    input_ids, _ = make_batch(seed + 1)
    lengths = torch.tensor([SEQLEN - 7, SEQLEN - 1])
    mask = (torch.arange(SEQLEN) < lengths.unsqueeze(1)).long()
    with torch.no_grad():
        ref = exact(input_ids=input_ids, attention_mask=mask).logits
        local = shard_batch(input_ids, attention_mask=mask, variant=variant)
        got = gather_logits(ring(input_ids=local["input_ids"], position_ids=local["position_ids"],
                                 attention_mask=local["attention_mask"]).logits, variant=variant)
    real = mask.bool()
    return rel_err(got[real], ref[real])


def bad_input_errors(rank, world_size, seed):
    """Each bad input on its own; returns {case: (type, message)} of what this rank raised. A case whose bad
    part is on one rank only still has to raise on every rank. The world's last call is a good one: it
    proves no rank was left inside a collective by an earlier refusal."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ring_flash_attn.integrations.hf import register_ring_attention, shard_batch
    
    narrow = register_head_dim_8_backend()
    name = register_ring_attention(variant="zigzag")
    ring, = make_models("llama", seed, name)
    input_ids, labels = make_batch(seed + 1)
    local = shard_batch(input_ids, labels, variant="zigzag")
    ids, pos = local["input_ids"], local["position_ids"]
    outcomes = {}

    left_pad = torch.ones_like(ids)
    if rank == world_size - 1:
        left_pad[0, 0] = 0  # one padding token on the last rank, before real tokens of other ranks
    outcomes["left_padding"] = outcome_of(lambda: ring(input_ids=ids, position_ids=pos, attention_mask=left_pad))

    packed = pos.clone()
    if rank == world_size - 1:
        packed[1, -3:] = torch.arange(3)  # a second sequence starts inside the last rank's slice
    outcomes["position_ids_not_from_shard_batch"] = outcome_of(lambda: ring(input_ids=ids, position_ids=packed))

    # the model then uses arange(local length) on every rank, which is not where zigzag puts the tokens
    outcomes["forgotten_position_ids"] = outcome_of(lambda: ring(input_ids=ids))

    custom_mask = torch.ones(BATCH, 1, ids.shape[1], ids.shape[1], dtype=torch.bool)
    outcomes["custom_4d_mask"] = outcome_of(lambda: ring(input_ids=ids, position_ids=pos, attention_mask=custom_mask))

    attention = ring.model.layers[0].self_attn
    q = torch.randn(BATCH, 4, ids.shape[1], 8, dtype=torch.float64)
    kv = torch.randn(BATCH, 4, ids.shape[1] + 4, 8, dtype=torch.float64)
    outcomes["cross_attention"] = outcome_of(
        lambda: ALL_ATTENTION_FUNCTIONS[name](attention, q, kv, kv, None, position_ids=pos))

    outcomes["seqlen_not_split"] = outcome_of(lambda: shard_batch(input_ids[:, :SEQLEN - 2], variant="zigzag"))

    register_ring_attention(variant="zigzag", backend=narrow)  # the llama layers have head_dim 8
    outcomes["head_dim_8_served"] = outcome_of(lambda: ring(input_ids=ids, position_ids=pos))
    wide, = make_models("llama", seed, name, head_dim=16)
    outcomes["head_dim_16_refused"] = outcome_of(lambda: wide(input_ids=ids, position_ids=pos))

    register_ring_attention(variant="zigzag")

    def generate_one_token():
        first = ring(input_ids=ids, position_ids=pos, use_cache=True)
        cache = first.past_key_values if hasattr(first, "past_key_values") else first.cache
        ring(input_ids=ids[:, -1:], position_ids=pos[:, -1:] + 1, past_key_values=cache)

    outcomes["kv_cache_generation"] = outcome_of(generate_one_token)
    # model.generate's first step fills a KV cache with position ids of its own (not the layout's); without a
    # cache it recomputes the sequence, one token longer, with them
    outcomes["model_generate"] = outcome_of(lambda: ring.generate(ids, max_new_tokens=2, do_sample=False,
                                                                  use_cache=True))
    outcomes["model_generate_without_cache"] = outcome_of(lambda: ring.generate(ids, max_new_tokens=2,
                                                                                do_sample=False, use_cache=False))

    def with_attention_dropout():
        for layer in ring.model.layers:
            layer.self_attn.attention_dropout = 0.1
        try:
            ring.train()(input_ids=ids, position_ids=pos)
        finally:
            for layer in ring.model.layers:
                layer.self_attn.attention_dropout = 0.0

    outcomes["attention_dropout"] = outcome_of(with_attention_dropout)
    outcomes["non_causal_zigzag"] = outcome_of(
        lambda: ALL_ATTENTION_FUNCTIONS[name](attention, q, q, q, None, position_ids=pos, is_causal=False))
    outcomes.update(silently_eager_outcomes(seed, name))
    outcomes["good_call_after"] = outcome_of(lambda: ring(input_ids=ids, position_ids=pos))
    return outcomes


def silently_eager_outcomes(seed, name):
    """Two models built from one config object share ``config._attn_implementation``: resetting the second
    to eager silently turns the first to eager too, which then attends within each rank's slice only.
    gather_logits must refuse those logits, and accept them once the ring runs again."""
    from transformers import AutoModelForCausalLM

    from ring_flash_attn.integrations.hf import gather_logits, shard_batch

    config = tiny_config("llama")
    torch.manual_seed(seed)
    first = AutoModelForCausalLM.from_config(config, attn_implementation=name, dtype=torch.float64)
    second = AutoModelForCausalLM.from_config(config, attn_implementation=name, dtype=torch.float64)
    second.set_attn_implementation("eager")
    assert first.config._attn_implementation == "eager"  # the trap this guards against
    input_ids, _ = make_batch(seed + 2)
    local = shard_batch(input_ids, variant="zigzag")
    run = lambda: first(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits  # noqa: E731
    outcomes = {"silently_eager_model": outcome_of(lambda: gather_logits(run(), variant="zigzag"))}
    first.set_attn_implementation(name)
    outcomes["gather_after_ring_forward"] = outcome_of(lambda: gather_logits(run(), variant="zigzag"))
    logits = run()
    gather_logits(logits, variant="zigzag")
    outcomes["second_gather_without_forward"] = outcome_of(lambda: gather_logits(logits, variant="zigzag"))
    return outcomes


def zhuzilin_compat_errors(rank, world_size, seed):
    """The replaced project's flow: substitute_hf_flash_attn, then per packed batch of batch size 1:
    update_ring_flash_attn_params(cu_seqlens), contiguous pieces, local position ids. Relative errors against
    every sequence run on its own, for a model loaded as "ring_attention" and one dispatching on
    "flash_attention_2"."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # The import path the replaced project documents (its README): the top-level package.
    from ring_flash_attn import substitute_hf_flash_attn, update_ring_flash_attn_params

    group = dist.new_group(list(range(world_size)))
    substitute_hf_flash_attn(group, heads_k_stride=1)
    lengths = (10, 15, 7)  # sequences cross the pieces' boundaries, as the replaced project allows
    input_ids, position_ids, labels = make_packed_batch(seed + 1, (lengths,))
    results = {"flash_attention_2_substituted": ALL_ATTENTION_FUNCTIONS["flash_attention_2"].__name__}
    cu_seqlens = torch.tensor([0, 10, 25, 32], dtype=torch.int32)
    update_ring_flash_attn_params(cu_seqlens, group)

    register_exact_eager()
    exact, ring = make_models("mistral", seed, EXACT_EAGER, "ring_attention")
    ref, _, ref_grads = packed_reference_run(exact, input_ids, labels, (lengths,))

    # Test-only shim: transformers refuses "flash_attention_2" at load time without the flash-attn package
    # (not installable on CPU), so this model is switched by setting the config field its layers dispatch on.
    flash, = make_models("mistral", seed, "eager")
    flash.config._attn_implementation = "flash_attention_2"

    piece = SEQLEN // world_size
    mine = slice(rank * piece, (rank + 1) * piece)
    n_targets = int((labels != -100).sum())
    for model_name, model in (("ring_attention", ring), ("flash_attention_2", flash)):
        logits_local = model(input_ids=input_ids[:, mine], position_ids=position_ids[:, mine]).logits
        loss = F.cross_entropy(logits_local.flatten(0, 1), labels[:, mine].flatten(), reduction="sum") / n_targets
        loss.backward()
        shards = [torch.empty_like(logits_local) for _ in range(world_size)]
        dist.all_gather(shards, logits_local.detach())
        results[model_name] = {"logits": rel_err(torch.cat(shards, dim=1), ref),
                               "grads": worst_grad_error(reduce_grads(model, average_over=1), ref_grads)}
    results["batch_of_two"] = outcome_of(
        lambda: ring(input_ids=input_ids[:, mine].repeat(2, 1), position_ids=position_ids[:, mine].repeat(2, 1)))
    return results


def world_checks(rank, world_size, cases, misc_seed=None):
    """Every model case, and with ``misc_seed`` the other checks too: one world start for all of them."""
    from tests.integrations.zhuzilin_workers import loaded_before_registering, zhuzilin_api_checks

    loaded_early = loaded_before_registering(rank, world_size, cases[0][2] + 800)  # first: nothing registered yet
    results = {"models": model_errors(rank, world_size, cases),
               "two_rings": two_rings_errors(rank, world_size, cases[0][2] + 700) if world_size >= 4 else None,
               "packed": {variant: packed_errors(rank, world_size, variant, cases[0][2] + 500 + n)
                          for n, variant in enumerate(PACKED_VARIANTS)}}
    if misc_seed is not None:
        results.update(misc_checks(rank, world_size, misc_seed))
    # Last: these substitute transformers' flash attention, as the replaced project's clients do.
    results["zhuzilin_api"] = dict(zhuzilin_api_checks(rank, world_size, cases[0][2] + 900),
                                   loaded_before_registering=loaded_early)
    return results


def autocast_error(rank, world_size, seed):
    """A float32 model under bfloat16 autocast (as the trainer runs it): gathered logits against the float32
    exact reference without autocast."""
    from ring_flash_attn.integrations.hf import gather_logits, register_ring_attention, shard_batch

    register_exact_eager()
    name = register_ring_attention(variant="zigzag")
    exact, ring = (model.float() for model in make_models("llama", seed, EXACT_EAGER, name))
    input_ids, _ = make_batch(seed + 1)
    local = shard_batch(input_ids, variant="zigzag")
    with torch.no_grad():
        ref = exact(input_ids=input_ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits_local = ring(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits
        got = gather_logits(logits_local.float(), variant="zigzag")
    return rel_err(got, ref)


def misc_checks(rank, world_size, seed):
    return {"autocast_bfloat16": autocast_error(rank, world_size, seed + 3),"bad_inputs": bad_input_errors(rank, world_size, seed),
            "right_padding": {variant: right_padding_error(rank, world_size, variant, seed + 1)
                              for variant in ("zigzag", "ring")},
            "zhuzilin": zhuzilin_compat_errors(rank, world_size, seed + 2)}
