"""Model patching: Hugging Face transformers (:mod:`.hf`) and Megatron-Core (:mod:`.megatron`).

Both are optional extras (``pip install .[hf]`` / ``.[megatron]``). Names are
resolved lazily, so ``import ring_flash_attn`` (or this package) never imports
transformers or megatron-core; the first use of a name imports its module and
checks the installed version.
"""

from ..lazy import lazy_exports

_EXPORTS = {
    "register_ring_attention": ".hf",
    "shard_batch": ".hf",
    "gather_logits": ".hf",
    "substitute_hf_flash_attn": ".hf",
    "update_ring_flash_attn_params": ".hf",
    "RingCoreAttention": ".megatron",
    "ring_gpt_layer_spec": ".megatron",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


def __dir__():
    return sorted(set(globals()) | set(__all__))
