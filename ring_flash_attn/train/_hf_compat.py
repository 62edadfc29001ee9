"""TEMPORARY shim: the Hugging Face integration's three functions, until ``ring_flash_attn.integrations.hf`` lands.

The trainer imports ``register_ring_attention``, ``shard_batch`` and
``gather_logits`` from here. When the real integration module is importable it
is used as-is; otherwise the minimal stand-ins below implement the same API
with transformers' public ``AttentionInterface``. Delete this module (and
import from ``ring_flash_attn.integrations.hf``) once the integration is merged.
"""

from __future__ import annotations

try:
    from ring_flash_attn.integrations.hf import gather_logits, register_ring_attention, shard_batch
except ImportError:
    from typing import Optional

    import torch
    import torch.distributed as dist

    from ring_flash_attn import gather_sequence, ring_attention, shard_sequence

    # Not "ring_flash_attn": transformers >= 5 treats any attn_implementation containing "flash" as a
    # flash-attention kernel to import from the Hub, and fails.
    ATTENTION_NAME = "ring_attention"

    def register_ring_attention(group: Optional[dist.ProcessGroup] = None, variant: str = "zigzag",
                                backend: Optional[str] = None) -> str:
        """Register ring attention over ``group`` as a transformers attn_implementation; returns its name."""
        from transformers import AttentionInterface

        def ring_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                   scaling: Optional[float] = None, **kwargs):
            # transformers does not build a mask for an attention name it has no mask function for, so a mask
            # here came from the caller (padding): ring attention applies only the causal mask.
            if attention_mask is not None:
                raise ValueError("attention_mask: ring attention supports causal attention over packed "
                                 "sequences only; pass attention_mask=None")
            if not getattr(module, "is_causal", True):
                raise ValueError(f"{type(module).__name__}: ring attention here needs a causal attention module")
            device_type = query.device.type
            if torch.is_autocast_enabled(device_type):
                # Under autocast RoPE's float32 cos/sin promote q and k to float32 while v stays in the autocast
                # dtype; cast all three the way autocast casts scaled_dot_product_attention's inputs.
                dtype = torch.get_autocast_dtype(device_type)
                query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
            window = kwargs.get("sliding_window")
            out, _ = ring_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                    variant=variant, causal=True, softmax_scale=scaling,
                                    window_size=(window - 1, 0) if window else (-1, -1), group=group,
                                    backend=backend)
            return out, None

        AttentionInterface.register(ATTENTION_NAME, ring_attention_forward)
        return ATTENTION_NAME

    def shard_batch(input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                    position_ids: Optional[torch.Tensor] = None, *, variant: str = "zigzag",
                    group: Optional[dist.ProcessGroup] = None) -> dict:
        """This rank's slices (dim 1) of the full-sequence tensors; labels already shifted by the caller."""
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        shards = {"input_ids": input_ids, "position_ids": position_ids}
        if labels is not None:
            shards["labels"] = labels
        return {name: shard_sequence(t, variant, rank, world_size, dim=1) for name, t in shards.items()}

    def gather_logits(logits_local: torch.Tensor, *, variant: str = "zigzag",
                      group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
        """Every rank's logits slice put back in sequence order (differentiable)."""
        return gather_sequence(logits_local, variant, group, dim=1)

__all__ = ["register_ring_attention", "shard_batch", "gather_logits"]
