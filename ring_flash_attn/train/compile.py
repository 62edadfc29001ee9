"""``torch.compile`` per decoder layer (``train.compile: true``).

Compiling each block rather than the whole model keeps compile time to one
block's (the blocks share their code) and leaves FSDP's hooks between blocks,
as torchtitan does. The ring's communication inside attention is not traced
into the graph; Dynamo splits the graph around it.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import RunConfig
from .fsdp import decoder_layers


def apply_compile(model: nn.Module, config: RunConfig) -> nn.Module:
    if not config.train.compile:
        return model
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        layers[index] = torch.compile(layer, backend=config.train.compile_backend, fullgraph=False)
    return model
