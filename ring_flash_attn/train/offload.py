"""Activation offload: the checkpointed layers' inputs wait for the backward in pinned host memory.

With every layer checkpointed, what stays on the device between a step's forward and its backward is one
input per layer: [tokens, hidden] in the compute dtype, 4 KiB a token for a 2048-wide model in bf16, so
64 GiB for 16 layers at a million tokens. ``torch.utils.checkpoint`` (non-reentrant) saves a region's
inputs through autograd's saved-tensor hooks, outside its own, so hooks around each checkpointed layer
see exactly those inputs (nothing inside the layer: the checkpoint's own hooks take those). Here they are
copied to pinned host memory on a side stream as the forward goes on, the device copy is released as soon
as the copy is done, and in the backward each input is brought back on the side stream while the layer
after it (in backward order) still computes: unpacking layer i's input starts fetching layer i-1's.

Parameters, host tensors and tensors under ``MIN_BYTES`` stay where they are. Devices: CUDA and XPU
(through ``torch.Stream`` / ``torch.Event`` and pinned memory); on the CPU there is nothing to move, and
``train.offload_activations: true`` is a config error there.

Under ``torch.compile`` the hooks go around the compiled layer, whose saved tensors are then the ones the
compiler keeps for the backward (with the layer checkpointed, its inputs and little else).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Optional

import torch
from torch import nn

from .fsdp import decoder_layers

MIN_BYTES = 1 << 20  # smaller tensors are not worth a copy


class _HostCopy:
    """One saved tensor in pinned host memory, and its way back."""

    __slots__ = ("host", "copied", "device", "on_device", "fetched", "previous", "__weakref__")

    def __init__(self, host: torch.Tensor, copied: torch.Event, device: torch.device, previous):
        self.host = host
        self.copied = copied            # the device-to-host copy is done
        self.device = device
        self.on_device: Optional[torch.Tensor] = None  # fetched back, not handed out yet
        self.fetched: Optional[torch.Event] = None
        self.previous = previous        # weak reference to the copy saved just before this one


class ActivationOffload:
    """Saved-tensor hooks that keep large device tensors in pinned host memory until the backward needs them.

    On the CPU (``device`` cpu: what the tests use to check which tensors move and in what order) the copies
    are plain synchronous copies between host tensors.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.Stream(device=device) if device.type != "cpu" else None
        self._last: Optional[weakref.ReferenceType] = None
        self.moved_bytes = 0  # bytes copied to the host so far (for the plan's report and the tests)

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _side(self):
        return self.stream if self.stream is not None else contextlib.nullcontext()

    def _pack(self, tensor: torch.Tensor):
        if (tensor.device.type != self.device.type or isinstance(tensor, nn.Parameter)
                or tensor.numel() * tensor.element_size() < MIN_BYTES):
            return tensor
        if self.stream is not None:
            self.stream.wait_stream(torch.accelerator.current_stream(self.device))  # the tensor is written
        with self._side():
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.stream is not None)
            host.copy_(tensor, non_blocking=True)
            copied = self.stream.record_event() if self.stream is not None else None
        if self.stream is not None:
            # The device memory goes back to the allocator as soon as the caller drops it, and is reused only
            # once the side stream's copy is done: the caller's stream may run ahead meanwhile.
            tensor.record_stream(self.stream)
        self.moved_bytes += tensor.numel() * tensor.element_size()
        copy = _HostCopy(host, copied, tensor.device, self._last)
        self._last = weakref.ref(copy)
        return copy

    def _fetch(self, copy: _HostCopy) -> None:
        if self.stream is not None:
            self.stream.wait_event(copy.copied)
        with self._side():
            on_device = torch.empty(copy.host.shape, dtype=copy.host.dtype, device=copy.device)
            on_device.copy_(copy.host, non_blocking=True)
            copy.fetched = self.stream.record_event() if self.stream is not None else None
        copy.on_device = on_device

    def _unpack(self, copy):
        if not isinstance(copy, _HostCopy):
            return copy
        if copy.on_device is None:
            self._fetch(copy)
        tensor, copy.on_device = copy.on_device, None
        if self.stream is not None:
            current = torch.accelerator.current_stream(self.device)
            current.wait_event(copy.fetched)
            # Allocated on the side stream, used on this one: not to be reused before this stream is done with it.
            tensor.record_stream(current)
        earlier = copy.previous() if copy.previous is not None else None
        if earlier is not None and earlier.on_device is None:
            self._fetch(earlier)  # the next input the backward will ask for, while this layer computes
        return tensor


def apply_activation_offload(model: nn.Module, device: torch.device, is_checkpointed) -> ActivationOffload:
    """Offload the inputs of every decoder layer for which ``is_checkpointed(layer)`` holds (only a checkpointed
    layer saves nothing but its inputs). The layers keep their names: the hooks go around each layer's call."""
    offload = ActivationOffload(device)
    for layer in decoder_layers(model):
        if not is_checkpointed(layer):
            continue
        contexts = {}

        def enter(module, args, kwargs, contexts=contexts):
            context = offload.hooks()
            context.__enter__()
            contexts[id(module)] = context

        def leave(module, args, kwargs, output, contexts=contexts):
            contexts.pop(id(module)).__exit__(None, None, None)

        layer.register_forward_pre_hook(enter, with_kwargs=True)
        layer.register_forward_hook(leave, with_kwargs=True, always_call=True)
    return offload
