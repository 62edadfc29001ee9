"""A decoder-only transformers model from the run config: the full model on one rank, empty shells on the rest.

Nothing is downloaded. Every rank builds the model on the ``meta`` device (no
memory), the parallelisation wraps and shards it, each rank allocates only its
shards, and rank 0, the one rank that builds the whole model in host memory,
broadcasts each parameter as the ranks fill their shards.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from .config import ConfigError, ModelConfig
from .data import VOCAB_SIZE

# Embedding and LM-head matrices whose row count is a multiple of 64 map onto full matrix-engine tiles.
VOCAB_MULTIPLE = 64
# What wrappers (activation checkpointing, torch.compile) put in front of a wrapped module's names.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def padded_vocab_size() -> int:
    return -(-VOCAB_SIZE // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def model_config(config: ModelConfig, seq_len: int):
    """The transformers config of the run's model."""
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ConfigError("training needs transformers: pip install 'ring-attention-xpu[hf]'") from None
    fields = dict(vocab_size=padded_vocab_size(), hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                  num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                  max_position_embeddings=seq_len, rope_theta=config.rope_theta, use_cache=False)
    fields.update(config.extra)
    try:
        return AutoConfig.for_model(config.family, **fields)
    except ValueError as exc:
        raise ConfigError(f"config key model.family: transformers does not know {config.family!r}: {exc}") from None


def build_model(config: ModelConfig, seq_len: int, attn_implementation: str, seed: int) -> nn.Module:
    """A causal LM of ``config.family`` with fresh weights from ``seed``, whole, in host memory."""
    from transformers import AutoModelForCausalLM

    hf_config = model_config(config, seq_len)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn_implementation)


def build_empty_model(config: ModelConfig, seq_len: int, attn_implementation: str) -> nn.Module:
    """The same model on the ``meta`` device: structure and shapes, no memory."""
    from transformers import AutoModelForCausalLM

    hf_config = model_config(config, seq_len)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn_implementation)


def _plain_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def materialize_from_rank0(model: nn.Module, full_model: Optional[nn.Module], device: torch.device) -> None:
    """Allocate this rank's shards of the (sharded, meta) ``model`` on ``device`` and fill them with rank 0's
    ``full_model`` (None on the other ranks); every rank calls this.

    Parameters and persistent buffers travel through ``set_model_state_dict(broadcast_from_rank0=True)``; the
    buffers a state dict leaves out (rotary frequencies) are broadcast one by one, matched by name.
    """
    model.to_empty(device=device)
    full_state = full_model.state_dict() if full_model is not None else {}
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True,
                                                                    broadcast_from_rank0=True))
    source = dict(full_model.named_buffers()) if full_model is not None else {}
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if dist.get_rank() == 0:
                buffer.copy_(source[_plain_name(name)])
            dist.broadcast(buffer, src=0)


def token_loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   position_ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over the given tokens (labels already shifted), in float32.

    The caller divides by the token count of the whole step (every rank, every replica), so the sum, not a
    per-rank mean, is what goes into the loss.
    """
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
