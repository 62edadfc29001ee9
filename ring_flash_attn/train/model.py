"""A decoder-only transformers model, randomly initialised from the run config (nothing is downloaded)."""

from __future__ import annotations

import torch
from torch import nn

from .config import ConfigError, ModelConfig
from .data import VOCAB_SIZE

# Embedding and LM-head matrices whose row count is a multiple of 64 map onto full matrix-engine tiles.
VOCAB_MULTIPLE = 64


def padded_vocab_size() -> int:
    return -(-VOCAB_SIZE // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def build_model(config: ModelConfig, seq_len: int, attn_implementation: str, seed: int) -> nn.Module:
    """A causal LM of ``config.family`` with fresh weights from ``seed`` (identical on every rank), on the CPU."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise ConfigError("training needs transformers: pip install 'ring-attention-xpu[hf]'") from None
    fields = dict(vocab_size=padded_vocab_size(), hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                  num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                  max_position_embeddings=seq_len, rope_theta=config.rope_theta, use_cache=False)
    fields.update(config.extra)
    try:
        hf_config = AutoConfig.for_model(config.family, **fields)
    except ValueError as exc:
        raise ConfigError(f"config key model.family: transformers does not know {config.family!r}: {exc}") from None
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn_implementation)


def token_loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   position_ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over the given tokens (labels already shifted), in float32.

    The caller divides by the token count of the whole step (every rank, every replica), so the sum, not a
    per-rank mean, is what goes into the loss.
    """
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
