"""Names a package exports but imports only when first used (so that importing the package imports no
optional dependency such as transformers or megatron)."""

from __future__ import annotations

from importlib import import_module
from typing import Callable, Dict, Iterable


def lazy_exports(package: str, exports: Dict[str, str], namespace: dict,
                 submodules: Iterable[str] = ()) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``exports`` maps a name to the (relative) module defining it,
    and each of ``submodules`` names a submodule of the package; the first access imports that module and
    keeps the value in ``namespace`` (the package's globals)."""
    submodules = frozenset(submodules)

    def __getattr__(name: str):
        if name in submodules:
            value = import_module(f".{name}", package)
        elif name in exports:
            value = getattr(import_module(exports[name], package), name)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    return __getattr__
