"""zhuzilin/ring-flash-attention's import path for its Hugging Face helpers; ours live in
:mod:`ring_flash_attn.integrations.hf`, which ``ring_flash_attn.adapters.hf_adapter`` names. Importing this package
imports transformers, as there."""

from .hf_adapter import substitute_hf_flash_attn, update_ring_flash_attn_params

__all__ = ["substitute_hf_flash_attn", "update_ring_flash_attn_params"]
