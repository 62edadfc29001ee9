"""zhuzilin/ring-flash-attention's ``ring_flash_attn.zigzag_ring_flash_attn`` import path: aliases of
:mod:`ring_flash_attn.functional` (no logic of its own)."""

from .functional import (
    zigzag_ring_flash_attn_func,
    zigzag_ring_flash_attn_kvpacked_func,
    zigzag_ring_flash_attn_qkvpacked_func,
)

__all__ = [
    "zigzag_ring_flash_attn_func",
    "zigzag_ring_flash_attn_kvpacked_func",
    "zigzag_ring_flash_attn_qkvpacked_func",
]
