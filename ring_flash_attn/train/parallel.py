"""The whole parallelisation of a model in one place, in a fixed order (torchtitan's order).

The token-wise modules (MLPs, norms) are tiled over the sequence and activation checkpointing wraps each decoder layer first, compile
wraps the result, the checkpointed layers' inputs are offloaded around the compiled calls, the chunked loss
becomes a method of the model, and FSDP shards the layers and then the root: each step needs the one before
it (FSDP's units must be the outermost wrappers so its hooks run around compiled code, not inside it; the
loss method must exist for FSDP to treat it as a forward).
"""

from __future__ import annotations

import torch
from torch import nn

from .activation_checkpoint import apply_activation_checkpointing, is_checkpointed
from .compile import apply_compile
from .config import RunConfig
from .fsdp import apply_fsdp
from .loss import apply_chunked_loss
from .mesh import Mesh
from .offload import apply_activation_offload
from .tiling import apply_tiling


def parallelize(model: nn.Module, config: RunConfig, mesh: Mesh, device: torch.device) -> nn.Module:
    """``config`` with its memory choices resolved (memory_plan.resolve)."""
    apply_tiling(model, config.train.tile_mib)
    apply_activation_checkpointing(model, config)
    apply_compile(model, config)
    if config.train.offload_activations:
        apply_activation_offload(model, device, is_checkpointed)
    apply_chunked_loss(model, config.train.loss_chunk_mib,
                       config.train.compile_backend if config.train.compile else None)
    apply_fsdp(model, config, mesh.shard_mesh)
    return model
