"""Local attention kernels: one contract (:mod:`.base`), several backends.

Automatic choice walks :data:`PREFERENCE` (:data:`BAND_PREFERENCE` for calls with a
band mask) for the device type and takes the first backend that can serve the call; ``backend=`` or the environment variable
``RING_FLASH_ATTN_BACKEND`` forces one, and an explicit choice that cannot
serve the call raises NotImplementedError naming the backend and the reason,
never a silent fallback.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

from .base import Features, KernelBackend
from .reference import ReferenceBackend
from .sdpa import SdpaBackend
from .sycl import SyclBackend

ENV_VAR = "RING_FLASH_ATTN_BACKEND"

_REGISTRY: Dict[str, KernelBackend] = {}

# Most preferred first. ``reference`` is last everywhere: always correct, never fast.
PREFERENCE: Dict[str, tuple] = {
    "cpu": ("sdpa", "reference"),
    # flex before reference: it serves soft-capping, which sdpa cannot (measured: benchmarks/RESULTS.md).
    "cuda": ("sdpa", "flex", "reference"),
    # sycl after sdpa: PyTorch's XPU flash op (SYCL-TLA) serves plain fp16/bf16, and is
    # presumably faster than our kernels, but nobody has measured either on an Intel GPU
    # (none is reachable from this project). sycl serves what sdpa cannot there: float32
    # and softcap.
    "xpu": ("sdpa", "sycl", "reference"),
}

# Calls with a band mask (anything but none / top-left causal on a square block): PyTorch's fast fused
# ops cannot take them, so the sdpa backend would fall back to the memory-efficient op with a dense
# [Sq, Sk] bias. There the Triton kernels go first. Measured on one H100 80GB HBM3, torch 2.11.0+cu130,
# triton 3.6.0, bf16, 32/8 heads, head dim 128, 4096 x 4096 block, causal band offset by half a block
# (benchmarks/step_parts.py): forward 0.79 ms triton vs 2.55 ms sdpa, backward 3.98 vs 6.21 ms; and in
# half precision the efficient op's backward is wrong given the ring's global LSE (see sdpa.py), so
# sdpa declines those calls anyway.
# Not here: float32 on CUDA stays with sdpa (efficient op 6.2 ms vs triton 67 ms forward, 19.6 vs 103 ms
# backward: Triton's exact float32 products run without tensor cores); plain bands stay with sdpa
# (cuDNN 0.47 ms vs triton 0.75 ms forward, 1.36 vs 4.19 ms backward at 4096; the separate merge costs
# 0.12 ms, see benchmarks/RESULTS.md).
# On XPU (unmeasured: no Intel GPU here) PyTorch's flash op takes no band at all. The SYCL kernels take
# any band; they come after Triton, as on CUDA, and serve bands where Triton is not installed. Neither
# has been timed against the other on an Intel GPU.
# flex (PyTorch's FlexAttention, compiled) comes right after triton and serves what triton cannot (soft-capping,
# head_dim > 256). Measured on one H200, torch 2.11.0+cu130 (benchmarks/band_mask.py, RESULTS.md): with a
# window (4096, 0) across the blocks of a P = 8 ring, flex beats triton in fwd+bwd (191 vs 149 TFLOP/s at
# S_local 8192, 132 vs 127 at 4096) but loses the forward at 4096 (127 vs 195), and it compiles once per
# block shape, which packed batches of many lengths would pay at every new length: triton stays first.
# On XPU it also comes after sycl, whose kernels take soft-capping too: neither is measured there.
BAND_PREFERENCE: Dict[str, tuple] = {
    "cuda": ("triton", "flex", "sdpa", "reference"),
    "xpu": ("triton", "sycl", "flex", "sdpa", "reference"),
}


def preference(features: Features) -> tuple:
    """Backend names in the order automatic selection tries them for ``features``."""
    if features.band and features.device_type in BAND_PREFERENCE:
        return BAND_PREFERENCE[features.device_type]
    return PREFERENCE.get(features.device_type, ("reference",))


def register_backend(backend: KernelBackend, *, prefer_on: tuple = ()) -> None:
    """Add a backend; ``prefer_on`` device types put it first in their preference."""
    _REGISTRY[backend.name] = backend
    for device_type in prefer_on:
        order = PREFERENCE.get(device_type, ("reference",))
        PREFERENCE[device_type] = (backend.name,) + tuple(n for n in order if n != backend.name)


def available_backends() -> tuple:
    return tuple(_REGISTRY)


def get_backend(name: str) -> KernelBackend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"backend: expected one of {sorted(_REGISTRY)}, got {name!r}") from None


def select_backend(features: Features, name: Optional[str] = None) -> KernelBackend:
    """The backend for one call: ``name`` (or the environment variable) if given, else the best that fits."""
    name = name or os.environ.get(ENV_VAR) or None
    if name is not None:
        backend = get_backend(name)
        reason = backend.unsupported_reason(features)
        if reason:
            raise NotImplementedError(f"backend: {name!r} cannot serve this call: {reason}")
        return backend
    reasons = []
    for candidate in preference(features):
        backend = _REGISTRY.get(candidate)
        if backend is None:
            continue
        reason = backend.unsupported_reason(features)
        if reason is None:
            return backend
        reasons.append(f"{candidate}: {reason}")
    raise NotImplementedError("backend: no kernel backend can serve this call: " + "; ".join(reasons))


register_backend(ReferenceBackend())
register_backend(SdpaBackend())
register_backend(SyclBackend())  # placed in PREFERENCE / BAND_PREFERENCE["xpu"] above, never first
try:
    from .flex import FlexBackend
except ImportError:  # torch < 2.5 has no FlexAttention
    FlexBackend = None
if FlexBackend is not None:
    register_backend(FlexBackend())  # placed in PREFERENCE["cuda"] / BAND_PREFERENCE above, never first
try:
    from .triton_attention import TritonBackend
except ImportError:  # Triton is an optional extra ("pip install ring-attention-xpu[triton]")
    TritonBackend = None
if TritonBackend is not None:
    register_backend(TritonBackend())

__all__ = ["Features", "KernelBackend", "available_backends", "get_backend", "register_backend", "select_backend",
           "preference", "PREFERENCE", "BAND_PREFERENCE", "ENV_VAR"]
