"""Context-parallel ("ring") attention for long-context training.

A drop-in for zhuzilin/ring-flash-attention (same import name and function
signatures, and the same import paths: its per-variant modules such as
``ring_flash_attn.zigzag_ring_flash_attn`` and ``ring_flash_attn.adapters``) that
runs on Intel GPUs (XPU), NVIDIA GPUs and the CPU.
"""

from .lazy import lazy_exports

# Every name resolves on first use (PEP 562), so that ``import ring_flash_attn`` imports neither torch nor an
# optional dependency until something is used: the ``ring-attn`` command line (which lives in this package)
# then builds its parser and answers --help without importing torch.
_FUNCTIONAL = [
    "ring_attention",
    "ring_flash_attn_func",
    "ring_flash_attn_kvpacked_func",
    "ring_flash_attn_qkvpacked_func",
    "ring_flash_attn_varlen_func",
    "ring_flash_attn_varlen_kvpacked_func",
    "ring_flash_attn_varlen_qkvpacked_func",
    "stripe_flash_attn_func",
    "stripe_flash_attn_kvpacked_func",
    "stripe_flash_attn_qkvpacked_func",
    "zigzag_ring_flash_attn_func",
    "zigzag_ring_flash_attn_kvpacked_func",
    "zigzag_ring_flash_attn_qkvpacked_func",
    "zigzag_ring_flash_attn_varlen_func",
    "zigzag_ring_flash_attn_varlen_kvpacked_func",
    "zigzag_ring_flash_attn_varlen_qkvpacked_func",
]
_LLAMA3 = [
    "llama3_flash_attn_prepare_cu_seqlens",
    "llama3_flash_attn_varlen_func",
    "llama3_flash_attn_varlen_kvpacked_func",
    "llama3_flash_attn_varlen_qkvpacked_func",
    "zigzag_llama3_flash_attn_varlen_func",
]
_LAZY = {
    **{name: ".functional" for name in _FUNCTIONAL},
    **{name: ".llama3" for name in _LLAMA3},
    **{name: ".module" for name in ("RingAttention", "gather_sequence", "shard_sequence", "unshard_sequence")},
    **{name: ".ulysses" for name in ("UspGroups", "ulysses_attention", "usp_attention", "usp_process_groups")},
    # The replaced project's Hugging Face helpers at the top level (they import transformers).
    "substitute_hf_flash_attn": ".integrations.hf",
    "update_ring_flash_attn_params": ".integrations.hf",
}
# The replaced project's per-variant modules, importable as there (aliases of the functions above).
_SUBMODULES = ("llama3_flash_attn_varlen", "ring_flash_attn", "ring_flash_attn_varlen", "stripe_flash_attn",
               "zigzag_ring_flash_attn", "zigzag_ring_flash_attn_varlen")
__getattr__ = lazy_exports(__name__, _LAZY, globals(), _SUBMODULES)


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


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
