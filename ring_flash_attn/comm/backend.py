"""Which ``torch.distributed`` backend serves which device.

* xpu  -> ``xccl`` (upstream PyTorch >= 2.8, when ``torch.distributed.is_xccl_available()``);
          else ``ccl`` if the deprecated ``oneccl_bindings_for_pytorch`` imports; else an error.
* cuda -> ``nccl``
* cpu  -> ``gloo``

``RING_FLASH_ATTN_DIST_BACKEND`` (or the ``override`` argument) forces one.
"""

from __future__ import annotations

import importlib
import os
from typing import Optional

import torch.distributed as dist

ENV_VAR = "RING_FLASH_ATTN_DIST_BACKEND"


def _xccl_available() -> bool:
    check = getattr(dist, "is_xccl_available", None)
    return bool(check and check())


def _oneccl_bindings_importable() -> bool:
    try:
        importlib.import_module("oneccl_bindings_for_pytorch")  # registers the "ccl" backend as a side effect
    except ImportError:
        return False
    return True


def choose_backend(device_type: str, override: Optional[str] = None) -> str:
    """The process-group backend for ``device_type`` ("xpu", "cuda" or "cpu")."""
    override = override or os.environ.get(ENV_VAR) or None
    if override:
        return override
    if device_type == "xpu":
        if _xccl_available():
            return "xccl"
        if _oneccl_bindings_importable():
            return "ccl"
        raise RuntimeError(
            "device xpu: no collective backend. This torch has no XCCL (torch.distributed.is_xccl_available() is "
            "False) and oneccl_bindings_for_pytorch is not installed. Install a PyTorch >= 2.8 XPU build "
            f"(it ships XCCL), or set {ENV_VAR}.")
    if device_type == "cuda":
        return "nccl"
    if device_type == "cpu":
        return "gloo"
    raise ValueError(f"device: expected 'xpu', 'cuda' or 'cpu', got {device_type!r}")


def default_device_type() -> str:
    """The accelerator PyTorch sees (xpu, cuda, ...) or "cpu"."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return accelerator.current_accelerator().type
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"
