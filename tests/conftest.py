"""Test-session setup shared by every test module."""

import os

import torch

# Without a GPU, Triton kernels can only run interpreted. Triton reads this when a kernel is
# defined (at import), so it must be set before any test module imports the package.
if not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())):
    os.environ.setdefault("TRITON_INTERPRET", "1")

