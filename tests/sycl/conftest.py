"""Fixtures for the SYCL kernel tests: the AdaptiveCpp CPU build (see acpp_build.py) and an error log."""

from __future__ import annotations

import pytest

from .acpp_build import build_cpu_extension


@pytest.fixture(scope="session")
def sycl_cpu_build():
    """The CPU test build, attached to the ``sycl`` kernel backend."""
    from ring_flash_attn.kernels import sycl as sycl_backend

    module = build_cpu_extension()
    sycl_backend.use_extension(module)
    return module


# Largest relative error against the float64 reference per (dtype, quantity), printed after the run.
MAX_ERRORS: dict = {}


@pytest.fixture(scope="session")
def error_log():
    return MAX_ERRORS


def pytest_terminal_summary(terminalreporter):
    if not MAX_ERRORS:
        return
    terminalreporter.section("SYCL kernels: largest relative error against the float64 reference")
    for (dtype, quantity), error in sorted(MAX_ERRORS.items()):
        terminalreporter.write_line(f"{dtype:>15} {quantity:<24} {error:.3e}")
