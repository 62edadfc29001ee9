"""zhuzilin/ring-flash-attention's ``ring_flash_attn.adapters.hf_adapter``: aliases of
:mod:`ring_flash_attn.integrations.hf` (no logic of its own)."""

from ..integrations.hf import substitute_hf_flash_attn, update_ring_flash_attn_params

__all__ = ["substitute_hf_flash_attn", "update_ring_flash_attn_params"]
