"""Names a package exports but imports only when first used (so that importing the package imports no
optional dependency such as transformers or megatron)."""

from __future__ import annotations

from importlib import import_module
from typing import Callable, Dict


def lazy_exports(package: str, exports: Dict[str, str], namespace: dict) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``exports`` maps a name to the (relative) module defining it;
    the first access imports that module and keeps the value in ``namespace`` (the package's globals)."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(exports[name], package), name)
        namespace[name] = value
        return value

    return __getattr__
