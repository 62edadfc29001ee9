"""Context-parallel ("ring") attention for long-context training."""
