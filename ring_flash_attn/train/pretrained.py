"""A local Hugging Face model directory (``model.pretrained``): checked on every rank, loaded on rank 0.

Nothing is downloaded (``local_files_only``). Before the process group is
joined, every rank reads ``config.json`` and the safetensors headers (a few
KB; no tensor data) and compares every tensor's name and shape, and every
file's size, with what the config describes, so a missing, truncated or
mismatched directory stops every rank with the same one-line error. Then rank
0 alone reads the weights (see model.py: the other ranks receive their shards).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, Tuple

from torch import nn

from .config import ConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors old checkpoints hold that current transformers models compute instead of loading.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _fail(directory: Path, problem: str) -> ConfigError:
    return ConfigError(f"model.pretrained {str(directory)!r}: {problem}")


def load_config(directory: Path):
    """The directory's transformers config, or ConfigError naming what is wrong."""
    from transformers import AutoConfig

    if not directory.is_dir():
        raise _fail(directory, "no such directory")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise _fail(directory, "no config.json (expected a model saved with save_pretrained)")
    try:
        json.loads(config_file.read_text())
        return AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise _fail(directory, f"config.json cannot be read: {str(exc).splitlines()[0]}") from None


def _header(directory: Path, path: Path) -> Dict[str, Tuple[int, ...]]:
    """Tensor name -> shape of one safetensors file, after checking the file holds every byte the header names."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise _fail(directory, f"{path.name} is not a safetensors file ({exc})") from None
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    data_bytes = max((entry["data_offsets"][1] for entry in tensors.values()), default=0)
    size, expected = path.stat().st_size, 8 + length + data_bytes
    if size != expected:
        raise _fail(directory, f"{path.name} has {size} bytes, its header describes {expected} (truncated or "
                               f"corrupt)")
    return {name: tuple(entry["shape"]) for name, entry in tensors.items()}


def weight_files(directory: Path):
    """The safetensors files of the directory: one file, or the shards its index names."""
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    index = directory / INDEX_FILE
    if not index.is_file():
        raise _fail(directory, f"no {SINGLE_FILE} or {INDEX_FILE} (only safetensors weights are read)")
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError) as exc:
        raise _fail(directory, f"{INDEX_FILE} is unreadable ({exc})") from None
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise _fail(directory, f"{INDEX_FILE} names {len(missing)} missing file(s), e.g. {missing[0]}")
    return [directory / name for name in names]


def check_weights(directory: Path, empty_model: nn.Module) -> None:
    """Every tensor ``empty_model`` (on the meta device) needs is in the files, with its shape, and nothing else."""
    expected = {name: tuple(p.shape) for name, p in empty_model.named_parameters()}  # tied weights once
    persistent = set(empty_model.state_dict())
    expected.update({name: tuple(b.shape) for name, b in empty_model.named_buffers() if name in persistent})
    found: Dict[str, Tuple[int, ...]] = {}
    for path in weight_files(directory):
        found.update(_header(directory, path))
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(n for n in set(found) - set(expected) if not n.endswith(IGNORED_SUFFIXES))
    wrong = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
    if missing:
        raise _fail(directory, f"the weights lack {len(missing)} tensor(s) config.json describes, e.g. {missing[0]}")
    if unexpected:
        raise _fail(directory, f"the weights hold {len(unexpected)} tensor(s) config.json does not describe, e.g. "
                               f"{unexpected[0]}")
    if wrong:
        raise _fail(directory, f"tensor {wrong[0]} has shape {list(found[wrong[0]])} in the weights, config.json "
                               f"describes {list(expected[wrong[0]])} ({len(wrong)} mismatch(es))")
