"""Context-parallel ("ring") attention for long-context training.

A drop-in for zhuzilin/ring-flash-attention (same import name and function
signatures, and the same import paths: its per-variant modules such as
``ring_flash_attn.zigzag_ring_flash_attn`` and ``ring_flash_attn.adapters``) that
runs on Intel GPUs (XPU), NVIDIA GPUs and the CPU.
"""

from .functional import (
    ring_attention,
    ring_flash_attn_func,
    ring_flash_attn_kvpacked_func,
    ring_flash_attn_qkvpacked_func,
    ring_flash_attn_varlen_func,
    ring_flash_attn_varlen_kvpacked_func,
    ring_flash_attn_varlen_qkvpacked_func,
    stripe_flash_attn_func,
    stripe_flash_attn_kvpacked_func,
    stripe_flash_attn_qkvpacked_func,
    zigzag_ring_flash_attn_func,
    zigzag_ring_flash_attn_kvpacked_func,
    zigzag_ring_flash_attn_qkvpacked_func,
    zigzag_ring_flash_attn_varlen_func,
    zigzag_ring_flash_attn_varlen_kvpacked_func,
    zigzag_ring_flash_attn_varlen_qkvpacked_func,
)
from .lazy import lazy_exports
from .llama3 import (
    llama3_flash_attn_prepare_cu_seqlens,
    llama3_flash_attn_varlen_func,
    llama3_flash_attn_varlen_kvpacked_func,
    llama3_flash_attn_varlen_qkvpacked_func,
    zigzag_llama3_flash_attn_varlen_func,
)
from .module import RingAttention, gather_sequence, shard_sequence, unshard_sequence
from .ulysses import UspGroups, ulysses_attention, usp_attention, usp_process_groups

# The replaced project's per-variant modules, importable as there (aliases of the functions above).
from . import (  # noqa: E402,F401  (isort: skip)
    llama3_flash_attn_varlen,
    ring_flash_attn,
    ring_flash_attn_varlen,
    stripe_flash_attn,
    zigzag_ring_flash_attn,
    zigzag_ring_flash_attn_varlen,
)

# Its Hugging Face helpers at the top level, resolved on first use so that ``import ring_flash_attn`` does
# not import transformers.
_LAZY = {"substitute_hf_flash_attn": ".integrations.hf", "update_ring_flash_attn_params": ".integrations.hf"}
__getattr__ = lazy_exports(__name__, _LAZY, globals())

__version__ = "0.1.0"

__all__ = [
    "ring_attention",
    "ring_flash_attn_func",
    "ring_flash_attn_kvpacked_func",
    "ring_flash_attn_qkvpacked_func",
    "zigzag_ring_flash_attn_func",
    "zigzag_ring_flash_attn_kvpacked_func",
    "zigzag_ring_flash_attn_qkvpacked_func",
    "ring_flash_attn_varlen_func",
    "ring_flash_attn_varlen_kvpacked_func",
    "ring_flash_attn_varlen_qkvpacked_func",
    "zigzag_ring_flash_attn_varlen_func",
    "zigzag_ring_flash_attn_varlen_kvpacked_func",
    "zigzag_ring_flash_attn_varlen_qkvpacked_func",
    "stripe_flash_attn_func",
    "stripe_flash_attn_kvpacked_func",
    "stripe_flash_attn_qkvpacked_func",
    "llama3_flash_attn_prepare_cu_seqlens",
    "llama3_flash_attn_varlen_func",
    "llama3_flash_attn_varlen_kvpacked_func",
    "llama3_flash_attn_varlen_qkvpacked_func",
    "zigzag_llama3_flash_attn_varlen_func",
    "RingAttention",
    "gather_sequence",
    "shard_sequence",
    "unshard_sequence",
    "substitute_hf_flash_attn",
    "update_ring_flash_attn_params",
    "ulysses_attention",
    "usp_attention",
    "usp_process_groups",
    "UspGroups",
]
