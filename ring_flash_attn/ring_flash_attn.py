"""zhuzilin/ring-flash-attention's ``ring_flash_attn.ring_flash_attn`` import path: aliases of
:mod:`ring_flash_attn.functional` (no logic of its own)."""

from .functional import (
    ring_flash_attn_func,
    ring_flash_attn_kvpacked_func,
    ring_flash_attn_qkvpacked_func,
)

__all__ = [
    "ring_flash_attn_func",
    "ring_flash_attn_kvpacked_func",
    "ring_flash_attn_qkvpacked_func",
]
