"""``torch.compile`` per decoder layer (``train.compile: true``).

Compiling each block rather than the whole model keeps compile time to one
block's (the blocks share their code) and leaves FSDP's hooks between blocks,
as torchtitan does. At cp = 1 the layers attend with transformers' SDPA attention,
which compiles into each layer's graph. Ring attention runs outside the graphs: its communication
and its cross-rank agreement on the inputs (host-side decisions) are not
traceable, so the attention function is excluded from tracing once, and
Dynamo compiles the code before and after it in each layer. Its kernels are
PyTorch's own fused ops either way.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import RunConfig
from .fsdp import decoder_layers


def _exclude_attention_from_tracing(model: nn.Module) -> None:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ..integrations.hf import is_ring_attention

    name = model.config._attn_implementation
    if not is_ring_attention(name):  # transformers' own attention (cp = 1) compiles into the layer's graph
        return
    attention = ALL_ATTENTION_FUNCTIONS[name]
    if not getattr(attention, "_excluded_from_tracing", False):
        excluded = torch._dynamo.disable(attention)
        excluded._excluded_from_tracing = True
        AttentionInterface.register(name, excluded)


def apply_compile(model: nn.Module, config: RunConfig) -> nn.Module:
    if not config.train.compile:
        return model
    _exclude_attention_from_tracing(model)
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        layers[index] = torch.compile(layer, backend=config.train.compile_backend)
    return model
