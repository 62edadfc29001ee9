"""Sharding parameters, gradients and optimizer state with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each decoder layer is one FSDP unit (its parameters are all-gathered just
before it runs and freed after), and the root takes what is left (embeddings,
final norm, LM head). Under ``precision: bf16`` the
``MixedPrecisionPolicy`` computes in bfloat16 from float32 master weights and
reduces gradients in float32.

Gradients are reduce-scattered as a SUM, not FSDP's default mean: each rank's
loss is its token-loss sum divided by the token count of the whole step (every
replica, every context-parallel rank), and every rank's gradient holds only
its own tokens' contribution (ring attention's backward has already sent K/V
gradients back to the ranks that own those tokens), so the sum over all ranks
is exactly the gradient of the step's mean loss, as on one process.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                    register_fsdp_forward_method)

from .config import RunConfig
from .loss import LOSS_METHOD


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks of a transformers causal LM (``model.model.layers`` for Llama, Mistral, Qwen...)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: expected its decoder to hold its blocks in .layers "
                        f"(an nn.ModuleList), as transformers' decoder-only models do")
    return layers


def mixed_precision(config: RunConfig) -> MixedPrecisionPolicy:
    if config.train.precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(model: nn.Module, config: RunConfig, shard_mesh) -> nn.Module:
    """Shard ``model`` in place over ``shard_mesh``: every decoder layer, then the root. With
    ``parallel.cpu_offload`` the shards (weights, gradients, optimizer state) live in pinned host memory."""
    policy = mixed_precision(config)
    offload = CPUOffloadPolicy(pin_memory=True) if config.parallel.cpu_offload else OffloadPolicy()
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        # The last layer's parameters are needed again at once by the backward: keep them gathered.
        fully_shard(layer, mesh=shard_mesh, mp_policy=policy, offload_policy=offload,
                    reshard_after_forward=index < len(layers) - 1)
    fully_shard(model, mesh=shard_mesh, mp_policy=policy, offload_policy=offload)
    if hasattr(model, LOSS_METHOD):  # the trainer's loss (loss.py) gathers the root's weights as a forward does
        register_fsdp_forward_method(model, LOSS_METHOD)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # a SUM: see the module docstring
            # A plain SUM on the wire (no NCCL PreMulSum, which gloo lacks; dividing by 1 is a no-op).
            module.set_force_sum_reduction_for_comms(True)
    return model


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters and optimizer state this rank holds (its shards): what falls as 1 / ranks."""
    tensors = list(model.parameters())
    tensors += [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    return sum(_local(t).numel() * t.element_size() for t in tensors)
