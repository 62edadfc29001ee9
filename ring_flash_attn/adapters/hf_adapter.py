"""zhuzilin/ring-flash-attention's ``ring_flash_attn.adapters.hf_adapter``: this import path is
:mod:`ring_flash_attn.integrations.hf` itself (the same module object), so that what a client reads or replaces
here (``DATA_PARAMS``, ``create_ring_flash_attention_forward``, ``RING_ATTN_SWITCH``) is what our
``substitute_hf_flash_attn`` reads, as in that project. Importing it imports transformers, as there."""

import sys

from ..integrations import hf

sys.modules[__name__] = hf  # the import system hands out the module that a module puts here in its place
