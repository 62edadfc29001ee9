"""Activation checkpointing per decoder layer (``train.activation_checkpointing``).

At 64k-128k tokens a sequence's activations, not the weights, fill a device.
A checkpointed layer keeps only its input and recomputes the rest in the
backward (ring attention's forward included: the recomputation runs the ring
again on every rank in the same order, so the ranks stay in step).
``full`` checkpoints every layer; ``every_n`` every n-th
(``train.activation_checkpointing_n``), trading memory for less recomputation;
``auto`` is resolved by the memory plan (memory_plan.py) before the model is built.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper

from .config import RunConfig
from .fsdp import decoder_layers


def apply_activation_checkpointing(model: nn.Module, config: RunConfig) -> nn.Module:
    mode = config.train.activation_checkpointing
    if mode == "auto":
        raise ValueError("train.activation_checkpointing 'auto' must be resolved by the memory plan first")
    if mode == "none":
        return model
    every = 1 if mode == "full" else config.train.activation_checkpointing_n
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        if index % every == 0:
            # Non-reentrant (torch.utils.checkpoint's recommended mode): keyword arguments and FSDP2 work.
            layers[index] = checkpoint_wrapper(layer, preserve_rng_state=False)
    return model


def is_checkpointed(layer: nn.Module) -> bool:
    """Whether a decoder layer (possibly compiled around its checkpoint wrapper) is checkpointed."""
    return isinstance(getattr(layer, "_orig_mod", layer), CheckpointWrapper)
