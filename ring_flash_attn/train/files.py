"""Small file-system helpers of the trainer's checkpoints and token caches."""

from __future__ import annotations

import zlib
from pathlib import Path


def file_crc32(path: Path, block_bytes: int = 1 << 22) -> int:
    """CRC-32 of a file's bytes, read a block at a time (checkpoint shards and token caches are GBs)."""
    crc = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(block_bytes), b""):
            crc = zlib.crc32(block, crc)
    return crc
