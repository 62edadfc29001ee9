"""zhuzilin/ring-flash-attention's ``ring_flash_attn.stripe_flash_attn`` import path: aliases of
:mod:`ring_flash_attn.functional` (no logic of its own)."""

from .functional import (
    stripe_flash_attn_func,
    stripe_flash_attn_kvpacked_func,
    stripe_flash_attn_qkvpacked_func,
)

__all__ = [
    "stripe_flash_attn_func",
    "stripe_flash_attn_kvpacked_func",
    "stripe_flash_attn_qkvpacked_func",
]
