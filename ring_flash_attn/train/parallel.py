"""The whole parallelisation of a model in one place, in a fixed order (torchtitan's order).

Activation checkpointing wraps each decoder layer first, compile wraps the
result, and FSDP shards the compiled, checkpointed layers and then the root:
each step needs the one before it (FSDP's units must be the outermost
wrappers so its hooks run around compiled code, not inside it).
"""

from __future__ import annotations

from torch import nn

from .activation_checkpoint import apply_activation_checkpointing
from .compile import apply_compile
from .config import RunConfig
from .fsdp import apply_fsdp
from .mesh import Mesh


def parallelize(model: nn.Module, config: RunConfig, mesh: Mesh) -> nn.Module:
    apply_activation_checkpointing(model, config)
    apply_compile(model, config)
    apply_fsdp(model, config, mesh.shard_mesh)
    return model
