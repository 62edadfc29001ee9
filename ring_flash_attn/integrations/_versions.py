"""Version gates for the optional integrations: a clear error naming the installed version, never a late
AttributeError deep inside a model."""

from __future__ import annotations

from packaging.version import Version


def require_version(distribution: str, installed: str, minimum: str, below: str) -> None:
    """Raise ImportError unless ``minimum <= installed < below``."""
    version = Version(installed)
    if not (Version(minimum) <= version < Version(below)):
        raise ImportError(f"ring_flash_attn.integrations supports {distribution} >= {minimum}, < {below}; "
                          f"installed: {distribution} {installed}. Install a supported version "
                          f"(pip install '{distribution}>={minimum},<{below}').")
