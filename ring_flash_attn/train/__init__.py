"""``ring-attn train``: long-context training of a decoder-only model with context parallelism.

Wired into the ``ring-attn`` command line through :func:`add_train_parser` and
:func:`main_train`; see docs/training.md.
"""

from .command import add_train_parser, main_train
from .config import ConfigError, RunConfig, load_config

__all__ = ["add_train_parser", "main_train", "ConfigError", "RunConfig", "load_config"]
