"""Functions that run on every rank of a Megatron-Core test world (module level, so spawn can pickle them).

Megatron-Core assumes CUDA in a few places that a CPU run reaches. Test-only shims, each explained where it
is applied; nothing in the package fakes a device:
  * ``use_cpu_initialization=True`` in the config: weights are created on the CPU (a supported option);
  * ``torch.cuda.current_device`` returns ``"cpu"``: Megatron passes it as the ``device`` of tensors it
    creates or moves (rotary frequencies, buffers), so on a CPU rank they stay on the CPU;
  * ``create_gloo_process_groups=False`` at ``initialize_model_parallel`` (the world already is gloo);
  * Megatron's reference attention builds its default causal and sliding-window masks with
    ``device="cuda"``: the test passes the causal mask itself and replaces the window-mask builder with the
    same formula on the CPU;
  * ``torch.tensor(..., pin_memory=True)`` ignores ``pin_memory`` and ``Tensor.cuda()`` returns the tensor
    itself: Megatron's own per-CP-rank rotary slicing (``get_pos_emb_on_this_cp_rank``, the split the ring
    must match) builds its index that way;
  * the RNG tracker Megatron uses for inference (``inference_rng_tracker=True``), whose ``fork`` touches no
    CUDA RNG state: DotProductAttention forks it around its dropout, and these tests have no dropout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.integrations.common import outcome_of, register_head_dim_8_backend
from tests.tolerances import rel_err

VOCAB, SEQLEN, BATCH = 64, 32, 2


def _sliding_window_causal_mask_on_cpu(sq, skv, window_size):
    """megatron.core.transformer.utils.get_sliding_window_causal_mask, on the CPU: True = hidden."""
    visible = torch.ones(sq, skv, dtype=torch.bool).triu(diagonal=skv - sq - window_size[0])
    return ~visible.tril(diagonal=skv - sq + window_size[1])


def _cpu_shims() -> None:
    from megatron.core.fusions import fused_softmax

    torch.cuda.current_device = lambda: "cpu"
    make_tensor = torch.tensor

    def tensor_without_pinning(*args, pin_memory=False, **kwargs):
        return make_tensor(*args, **kwargs)

    torch.tensor = tensor_without_pinning
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    fused_softmax.get_sliding_window_causal_mask = _sliding_window_causal_mask_on_cpu


def _init_parallel_state(context_parallel_size: int) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(context_parallel_size=context_parallel_size,
                                             create_gloo_process_groups=False)
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def tiny_config(context_parallel_size: int, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
                  kv_channels=8, attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True,
                  params_dtype=torch.float64, normalization="RMSNorm", add_bias_linear=False,
                  context_parallel_size=context_parallel_size, masked_softmax_fusion=False,
                  bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
                  attention_softmax_in_fp32=False)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_gpt(config, layer_spec):
    from megatron.core.models.gpt import GPTModel

    return GPTModel(config=config, transformer_layer_spec=layer_spec, vocab_size=VOCAB,
                    max_sequence_length=4 * SEQLEN, position_embedding_type="rope").double()


def make_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQLEN), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQLEN), generator=g)
    return tokens, labels


def loss_and_grads(model, tokens, labels, position_ids, n_tokens: int, attention_mask=None):
    """Sum of the per-token losses over ``n_tokens``, and every parameter's gradient.

    The loss is taken from the logits in float64: Megatron's own (``labels=``) casts the logits to float32."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=tokens, position_ids=position_ids, attention_mask=attention_mask)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / n_tokens
    loss.backward()
    return loss.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def gpt_errors(rank, world_size, seed, window_size):
    """Loss and gradient errors of a GPTModel with CP=world_size on RingCoreAttention, against the same
    weights with CP=1 on Megatron's own DotProductAttention (full sequence on every rank)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.utils import get_batch_on_this_cp_rank

    from ring_flash_attn.integrations.megatron import ring_gpt_layer_spec

    _cpu_shims()
    tokens, labels = make_batch(seed)
    position_ids = torch.arange(SEQLEN).expand(BATCH, SEQLEN)

    _init_parallel_state(1)
    torch.manual_seed(seed)
    reference = build_gpt(tiny_config(1, window_size=window_size), get_gpt_layer_local_spec(normalization="RMSNorm"))
    causal_mask = torch.ones(SEQLEN, SEQLEN, dtype=torch.bool).triu(diagonal=1).view(1, 1, SEQLEN, SEQLEN)
    ref_loss, ref_grads = loss_and_grads(reference, tokens, labels, position_ids, tokens.numel(), causal_mask)

    _init_parallel_state(world_size)
    ring = build_gpt(tiny_config(world_size, window_size=window_size), ring_gpt_layer_spec(normalization="RMSNorm"))
    ring.load_state_dict(reference.state_dict())
    local = get_batch_on_this_cp_rank({"tokens": tokens, "labels": labels, "position_ids": position_ids})
    loss, grads = loss_and_grads(ring, local["tokens"], local["labels"], local["position_ids"], tokens.numel())
    dist.all_reduce(loss)
    for g in grads.values():
        dist.all_reduce(g)
    return {"loss": rel_err(loss, ref_loss),
            "grads": max(rel_err(grads[name], ref_grads[name]) for name in ref_grads),
            "n_params": len(ref_grads)}


def bad_input_errors(rank, world_size):
    """{case: (type, message)} of what this rank raised for each bad input; the last case is a good call."""
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import AttnMaskType

    from ring_flash_attn.integrations.megatron import RingCoreAttention

    _cpu_shims()
    narrow = register_head_dim_8_backend()
    outcomes = {}

    def attention(config, mask_type=AttnMaskType.causal, attention_type="self", **kwargs):
        return RingCoreAttention(config, 1, mask_type, attention_type, **kwargs)

    _init_parallel_state(1)  # CP of one rank each: the world is not the CP group
    outcomes["ring_group_not_cp_group"] = outcome_of(lambda: attention(tiny_config(1), ring_group=dist.group.WORLD))

    _init_parallel_state(world_size)
    config = tiny_config(world_size)
    outcomes["cross_attention"] = outcome_of(lambda: attention(config, attention_type="cross"))
    outcomes["arbitrary_mask"] = outcome_of(lambda: attention(config, mask_type=AttnMaskType.arbitrary))
    outcomes["attention_dropout"] = outcome_of(lambda: attention(config, attention_dropout=0.1))
    outcomes["all_gather_cp"] = outcome_of(lambda: attention(config, cp_comm_type="all_gather"))

    def forward(module, seqlen, head_dim=8, **kwargs):
        q = torch.randn(seqlen, BATCH, 4, head_dim, dtype=torch.float64)
        kv = torch.randn(seqlen, BATCH, 2, head_dim, dtype=torch.float64)
        return module(q, kv, kv, None, **kwargs)

    good = attention(config, ring_group=parallel_state.get_context_parallel_group())
    outcomes["packed_seq_params"] = outcome_of(lambda: forward(good, 8, packed_seq_params=object()))
    outcomes["seqlen_not_split"] = outcome_of(lambda: forward(good, 7))
    wide = attention(tiny_config(world_size, kv_channels=16), backend=narrow)
    outcomes["head_dim_refused"] = outcome_of(lambda: forward(wide, 8, head_dim=16))
    outcomes["good_call_after"] = outcome_of(lambda: forward(good, 8))
    return outcomes


def megatron_checks(rank, world_size, seed):
    return {"causal": gpt_errors(rank, world_size, seed, None),
            "sliding_window": gpt_errors(rank, world_size, seed + 1, (5, 0)),
            "bad_inputs": bad_input_errors(rank, world_size)}
