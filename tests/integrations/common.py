"""Helpers shared by the integration test workers."""

from ring_flash_attn.kernels import available_backends, register_backend
from ring_flash_attn.kernels.reference import ReferenceBackend

NAME = "test_head_dim_8"


class HeadDim8Backend(ReferenceBackend):
    """A test-only kernel backend that, like many device kernels, serves only one head dim: it shows that a
    call the chosen backend cannot serve fails alike on every rank, before any communication."""

    name = NAME

    def unsupported_reason(self, features):
        return None if features.head_dim == 8 else f"head_dim must be 8, got {features.head_dim}"


def register_head_dim_8_backend() -> str:
    if NAME not in available_backends():
        register_backend(HeadDim8Backend())
    return NAME


def outcome_of(fn) -> tuple:
    """(exception type name, message) of what ``fn`` raises; ("none", "") if it returns."""
    try:
        fn()
    except Exception as exc:  # the tests compare type and message across ranks
        return type(exc).__name__, str(exc)
    return "none", ""
