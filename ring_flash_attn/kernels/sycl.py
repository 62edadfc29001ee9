"""The SYCL kernels of ``csrc/sycl`` as a kernel backend (Intel GPUs).

The compiled extension registers the ops ``torch.ops.ring_flash_attn_sycl.{fwd,
fwd_accumulate, bwd}`` for XPU tensors (``BUILD_SYCL=1 pip install .`` builds
``ring_flash_attn._sycl`` with icpx). A test build made with AdaptiveCpp registers
the same ops for CPU tensors instead (tests/sycl/conftest.py hands it over with
:func:`use_extension`). This module adds what the C++ side does not: fake kernels
so ``torch.compile`` can trace the ops, and autograd for ``fwd``.

The backend covers float32/float16/bfloat16 with head_dim 64 or 128, any band mask
(causal with offsets, sliding windows), GQA and soft-capping; not ALiBi. Its
``forward_accumulate`` folds a block into the running float32 (out, lse) inside
the kernel, with no separate merge pass.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from .base import Features, KernelBackend

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128)

_extension = None
_build_device_type: Optional[str] = None
_device_available = False
_load_error: Optional[str] = None
_python_parts_registered = False


def use_extension(module) -> None:
    """Use an already loaded build of the kernels (the installed one or a test build)."""
    global _extension, _load_error, _build_device_type, _device_available
    _extension, _load_error = module, None
    # Asked once: the answers do not change within a process, and torch.compile cannot trace pybind calls.
    _build_device_type = module.device_info()["device_type"]  # "xpu", or "cpu" for the AdaptiveCpp test build
    _device_available = bool(module.is_available())
    _register_python_parts()


def extension():
    """The loaded extension module, importing ``ring_flash_attn._sycl`` on first use; None if absent."""
    global _load_error
    if _extension is None and _load_error is None:
        try:
            use_extension(importlib.import_module("ring_flash_attn._sycl"))
        except Exception as error:  # not built (ImportError) or built against another torch/oneAPI
            _load_error = f"the SYCL extension ring_flash_attn._sycl is not available ({error}); " \
                          "build it with BUILD_SYCL=1 (docs/sycl.md)"
    return _extension


def unavailable_reason() -> Optional[str]:
    """None if the kernels are loaded and have a device to run on, else why not."""
    module = extension()
    if module is None:
        return _load_error
    if not _device_available:
        return f"the SYCL extension (built for {_build_device_type}) finds no device"
    return None


def _ops():
    return torch.ops.ring_flash_attn_sycl


def _mask_args(causal, window, q_offset, k_offset, softcap):
    left, right = (int(w) for w in window)
    return bool(causal), left, right, int(q_offset), int(k_offset), float(softcap or 0.0)


def _register_python_parts() -> None:
    """Fake kernels and autograd for the ops, once the library that defines them is loaded."""
    global _python_parts_registered
    if _python_parts_registered:
        return
    _python_parts_registered = True

    @torch.library.register_fake("ring_flash_attn_sycl::fwd")
    def _fwd_fake(q, k, v, scale, causal, window_left, window_right, q_offset, k_offset, softcap):
        b, s, h, _ = q.shape
        return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((b, h, s), dtype=torch.float32)

    @torch.library.register_fake("ring_flash_attn_sycl::fwd_accumulate")
    def _fwd_accumulate_fake(q, k, v, out_acc, lse_acc, scale, causal, window_left, window_right, q_offset,
                             k_offset, softcap):
        return None

    @torch.library.register_fake("ring_flash_attn_sycl::bwd")
    def _bwd_fake(dout, q, k, v, out, lse, dlse, scale, causal, window_left, window_right, q_offset, k_offset,
                  softcap):
        return (torch.empty_like(q, memory_format=torch.contiguous_format),
                torch.empty_like(k, memory_format=torch.contiguous_format),
                torch.empty_like(v, memory_format=torch.contiguous_format))

    def _setup_context(ctx, inputs, output):
        q, k, v, *mask = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask = mask  # scale, causal, window_left, window_right, q_offset, k_offset, softcap

    def _backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _ops().bwd(dout.contiguous(), q, k, v, out, lse, dlse, *ctx.mask)
        return dq, dk, dv, None, None, None, None, None, None, None

    torch.library.register_autograd("ring_flash_attn_sycl::fwd", _backward, setup_context=_setup_context)


class SyclBackend(KernelBackend):
    name = "sycl"

    def unsupported_reason(self, f: Features) -> Optional[str]:
        reason = unavailable_reason()
        if reason:
            return reason
        if f.device_type != _build_device_type:
            return f"this build of the SYCL kernels runs on {_build_device_type!r} tensors, got {f.device_type!r}"
        if f.dtype not in SUPPORTED_DTYPES:
            return f"the SYCL kernels take float32, float16 or bfloat16, got {f.dtype}"
        if f.head_dim not in SUPPORTED_HEAD_DIMS:
            return f"the SYCL kernels support head_dim 64 and 128, got head_dim={f.head_dim}"
        if f.alibi:
            return "the SYCL kernels have no ALiBi"
        return None

    def forward(self, q, k, v, *, scale, causal=False, window=(-1, -1), q_offset=0, k_offset=0, softcap=0.0):
        return _ops().fwd(q, k, v, float(scale), *_mask_args(causal, window, q_offset, k_offset, softcap))

    def forward_accumulate(self, q, k, v, out_acc, lse_acc, *, scale, causal=False, window=(-1, -1), q_offset=0,
                           k_offset=0, softcap=0.0) -> None:
        _ops().fwd_accumulate(q, k, v, out_acc, lse_acc, float(scale),
                              *_mask_args(causal, window, q_offset, k_offset, softcap))

    def backward(self, dout, q, k, v, out, lse, *, scale, causal=False, window=(-1, -1), q_offset=0, k_offset=0,
                 softcap=0.0):
        return _ops().bwd(dout, q, k, v, out, lse.float(), None, float(scale),
                          *_mask_args(causal, window, q_offset, k_offset, softcap))
