"""USP through the integrations, on a world of 4 CPU ranks (ulysses 2 x ring 2): transformers models and a
Megatron-Core GPTModel against the same weights on one process (float64 models)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.integrations import hf_workers, megatron_workers
from tests.integrations.common import outcome_of
from tests.tolerances import rel_err

ULYSSES_SIZE = 2
# (model kind, variant): Mistral has GQA with 2 K/V heads (one per Ulysses rank) and sliding windows; Gemma 2
# has one K/V head (repeated for the second Ulysses rank), alternating windows and soft-capping.
HF_CASES = (("mistral", "zigzag"), ("gemma2", "ring"), ("llama", "stripe"))


def hf_errors(seed):
    from ring_flash_attn.integrations.hf import gather_logits, register_ring_attention, shard_batch

    hf_workers.register_exact_eager()
    results = {}
    for n, (kind, variant) in enumerate(HF_CASES):
        name = register_ring_attention(variant=variant, ulysses_size=ULYSSES_SIZE)
        exact, usp = hf_workers.make_models(kind, seed + n, hf_workers.EXACT_EAGER, name)
        input_ids, labels = hf_workers.make_batch(seed + n + 100)
        ref_logits, ref_loss, ref_grads = hf_workers.reference_run(exact, input_ids, labels)
        local = shard_batch(input_ids, labels, variant=variant)
        logits = gather_logits(usp(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits,
                               variant=variant)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        grads = hf_workers.reduce_grads(usp, average_over=dist.get_world_size())
        results[f"{kind}-{variant}"] = {"logits": rel_err(logits, ref_logits), "loss": rel_err(loss, ref_loss),
                                        "grads": hf_workers.worst_grad_error(grads, ref_grads),
                                        "n_params": len(grads)}
    # Packed rows (Mistral): position ids restart per sequence; every sequence laid out over the 4 ranks alone.
    name = register_ring_attention(variant="zigzag", ulysses_size=ULYSSES_SIZE)
    exact, usp = hf_workers.make_models("mistral", seed + 50, hf_workers.EXACT_EAGER, name)
    input_ids, position_ids, labels = hf_workers.make_packed_batch(seed + 51)
    ref_logits, ref_loss, ref_grads = hf_workers.packed_reference_run(exact, input_ids, labels)
    local = shard_batch(input_ids, labels, position_ids, variant="zigzag")
    logits = gather_logits(usp(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits,
                           variant="zigzag", position_ids=position_ids)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    grads = hf_workers.reduce_grads(usp, average_over=dist.get_world_size())
    results["mistral-zigzag-packed"] = {"logits": rel_err(logits, ref_logits), "loss": rel_err(loss, ref_loss),
                                        "grads": hf_workers.worst_grad_error(grads, ref_grads),
                                        "n_params": len(grads)}
    register_ring_attention(variant="zigzag")  # back to the ring alone for whatever runs next
    return results


def megatron_errors(rank, world_size, seed):
    """GPTModel with CP 4 as Megatron's cp_comm_type 'a2a+p2p' (hierarchical sizes [2, 2]) on RingCoreAttention,
    against CP 1 on Megatron's own attention; then the bad inputs of the Ulysses arguments."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.utils import get_batch_on_this_cp_rank

    from ring_flash_attn.integrations.megatron import RingCoreAttention, ring_gpt_layer_spec

    megatron_workers._cpu_shims()
    tokens, labels = megatron_workers.make_batch(seed)
    seqlen, batch = megatron_workers.SEQLEN, megatron_workers.BATCH
    position_ids = torch.arange(seqlen).expand(batch, seqlen)

    megatron_workers._init_parallel_state(1)
    torch.manual_seed(seed)
    reference = megatron_workers.build_gpt(megatron_workers.tiny_config(1),
                                           get_gpt_layer_local_spec(normalization="RMSNorm"))
    causal_mask = torch.ones(seqlen, seqlen, dtype=torch.bool).triu(diagonal=1).view(1, 1, seqlen, seqlen)
    ref_loss, ref_grads = megatron_workers.loss_and_grads(reference, tokens, labels, position_ids, tokens.numel(),
                                                          causal_mask)

    megatron_workers._init_parallel_state(world_size)
    sizes = [ULYSSES_SIZE, world_size // ULYSSES_SIZE]
    config = megatron_workers.tiny_config(world_size, cp_comm_type="a2a+p2p", hierarchical_context_parallel_sizes=sizes)
    usp = megatron_workers.build_gpt(config, ring_gpt_layer_spec(normalization="RMSNorm"))
    usp.load_state_dict(reference.state_dict())
    attention = usp.decoder.layers[0].self_attention.core_attention
    local = get_batch_on_this_cp_rank({"tokens": tokens, "labels": labels, "position_ids": position_ids})
    loss, grads = megatron_workers.loss_and_grads(usp, local["tokens"], local["labels"], local["position_ids"],
                                                  tokens.numel())
    dist.all_reduce(loss)
    for g in grads.values():
        dist.all_reduce(g)
    errors = {"loss": rel_err(loss, ref_loss), "grads": max(rel_err(grads[n], ref_grads[n]) for n in ref_grads),
              "n_params": len(ref_grads), "mesh": (attention.usp.ulysses_size, attention.usp.ring_size)}

    def core(cfg, **kwargs):
        return RingCoreAttention(cfg, 1, AttnMaskType.causal, "self", **kwargs)

    plain = megatron_workers.tiny_config(world_size)
    bad = {"a2a+p2p without sizes": outcome_of(lambda: core(plain, cp_comm_type="a2a+p2p")),
           "ulysses_size against a2a": outcome_of(lambda: core(plain, cp_comm_type="a2a", ulysses_size=2)),
           "ulysses_size not dividing heads": outcome_of(lambda: core(
               megatron_workers.tiny_config(world_size, num_attention_heads=6, num_query_groups=2), ulysses_size=4)),
           "ulysses_size not positive": outcome_of(lambda: core(plain, ulysses_size=0)),
           "a2a good": outcome_of(lambda: core(plain, cp_comm_type="a2a"))}
    return errors, bad


def usp_integration_checks(rank, world_size, seed):
    return {"hf": hf_errors(seed), "megatron": megatron_errors(rank, world_size, seed + 1000)}
