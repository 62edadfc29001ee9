"""Local attention kernels: one contract (:mod:`.base`), several backends.

Automatic choice walks :data:`PREFERENCE` for the device type and takes the
first backend that can serve the call; ``backend=`` or the environment variable
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

ENV_VAR = "RING_FLASH_ATTN_BACKEND"

_REGISTRY: Dict[str, KernelBackend] = {}

# Most preferred first. ``reference`` is last everywhere: always correct, never fast.
PREFERENCE: Dict[str, tuple] = {
    "cpu": ("sdpa", "reference"),
    "cuda": ("sdpa", "reference"),
    "xpu": ("sdpa", "reference"),
}


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
    for candidate in PREFERENCE.get(features.device_type, ("reference",)):
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

__all__ = ["Features", "KernelBackend", "available_backends", "get_backend", "register_backend", "select_backend",
           "PREFERENCE", "ENV_VAR"]
