"""Tokenized corpora (``data.tokenizer``): tokenized once into a memory-mapped token cache, shared by ranks and runs.

A multi-GB corpus must not be tokenized by every rank or at every restart. The
cache key is a hash of the tokenizer's files and of the corpus (each source
file's path, size and modification time, the format, text key and byte
budget), so an edited corpus or another tokenizer gets a new cache, and a
restarted or repeated run finds its tokens ready. Under ``data.cache_dir``:

* ``<key>.tokens``: every document's token ids followed by the tokenizer's
  end-of-sequence id, int32, read through a memory map (pages load on demand);
* ``<key>.json``: token count, CRC32 of the tokens file, largest id, EOS id;
  written last, so a cache without it was never completed.

Rank 0 builds a missing cache (into temporary files renamed into place, under a
lock file ``<key>.lock`` that makes a second run wait for the first's build) while
the other ranks wait for its verdict on a process group of their own whose
timeout is long enough for a large corpus; a cache whose file no longer
matches its CRC32 is an error on every rank (delete it to rebuild), never
silently rebuilt or overwritten.
"""

from __future__ import annotations

import array
import fcntl
import functools
import hashlib
import json
import os
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .config import ConfigError, DataConfig
from .data import documents, source_files
from .files import file_crc32

CACHE_VERSION = 1
DEFAULT_CACHE_DIR = Path("~/.cache/ring_flash_attn/tokens")
# How long the other ranks wait for rank 0 to tokenize a corpus.
BUILD_TIMEOUT = timedelta(hours=24)
DOCUMENTS_PER_BATCH = 256
# Files one of which a saved transformers tokenizer holds (fast, SentencePiece, BPE vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# What a cache's metadata holds, each an integer (besides the tokenizer's path and the format version).
META_INTS = ("tokens", "crc32", "max_token", "eos")
# The array typecode of a native int32 (what torch.from_file reads back as torch.int32); no numpy needed.
INT32 = next(code for code in "il" if array.array(code).itemsize == 4)


@functools.lru_cache(maxsize=4)
def load_tokenizer(directory: str):
    """The transformers tokenizer saved in ``directory`` (no network), with an end-of-sequence token."""
    from transformers import AutoTokenizer

    if not Path(directory).is_dir():
        raise ConfigError(f"data.tokenizer {directory!r}: no such directory")
    if not any((Path(directory) / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"data.tokenizer {directory!r}: not a tokenizer directory (it holds none of "
                          f"{', '.join(TOKENIZER_FILES)}); give the directory a tokenizer was saved to with "
                          f"save_pretrained, often the model's own")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # transformers' message, whole, on one line
        raise ConfigError(f"data.tokenizer {directory!r}: cannot load a tokenizer from it: "
                          f"{' '.join(str(exc).split())}") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"data.tokenizer {directory!r}: has no end-of-sequence token (eos_token), which "
                          f"separates the packed documents")
    return tokenizer


def vocab_size(config: DataConfig) -> Optional[int]:
    """Token ids the data can hold (the tokenizer's, special tokens included); None for bytes."""
    return len(load_tokenizer(config.tokenizer)) if config.tokenizer else None


def _cache_key(config: DataConfig) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{config.source}|{config.format}|{config.text_key}|"
                            f"{config.max_bytes}".encode())
    for path in sorted(p for p in Path(config.tokenizer).iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for path in source_files(config):
        stat = path.stat()
        digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def cache_paths(config: DataConfig) -> Tuple[Path, Path]:
    root = Path(config.cache_dir).expanduser() if config.cache_dir else DEFAULT_CACHE_DIR.expanduser()
    key = _cache_key(config)
    return root / f"{key}.tokens", root / f"{key}.json"


def _build(config: DataConfig, tokens_path: Path, meta_path: Path) -> None:
    tokenizer = load_tokenizer(config.tokenizer)
    tokens_path.parent.mkdir(parents=True, exist_ok=True)
    scratch = tokens_path.with_name(f"{tokens_path.name}.tmp{os.getpid()}")
    count, crc, largest, batch = 0, 0, -1, []

    def flush(handle):
        nonlocal count, crc, largest
        ids = tokenizer([d.decode("utf-8", errors="replace") for d in batch], add_special_tokens=False)["input_ids"]
        flat = [t for doc in ids for t in (*doc, tokenizer.eos_token_id)]
        data = array.array(INT32, flat).tobytes()
        handle.write(data)
        count, crc, largest = count + len(flat), zlib.crc32(data, crc), max([largest, *flat])
        batch.clear()

    try:
        with open(scratch, "wb") as handle:
            for doc in documents(config):
                batch.append(doc)
                if len(batch) == DOCUMENTS_PER_BATCH:
                    flush(handle)
            if batch:
                flush(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(scratch, tokens_path)
    finally:
        scratch.unlink(missing_ok=True)
    meta = {"version": CACHE_VERSION, "tokens": count, "crc32": crc, "max_token": largest,
            "eos": tokenizer.eos_token_id, "tokenizer": str(config.tokenizer)}
    meta_scratch = meta_path.with_name(f"{meta_path.name}.tmp{os.getpid()}")
    meta_scratch.write_text(json.dumps(meta, indent=1))
    os.rename(meta_scratch, meta_path)


def verify(tokens_path: Path, meta_path: Path) -> Optional[str]:
    """Why the completed cache at these paths cannot be used, or None."""
    advice = "; delete both files to rebuild it"
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, OSError) as exc:
        return f"token cache {meta_path} is unreadable ({exc}){advice}"
    if not isinstance(meta, dict) or any(type(meta.get(key)) is not int for key in META_INTS):
        return (f"token cache {meta_path} is not the metadata of a token cache (expected a JSON object with the "
                f"integers {', '.join(META_INTS)}){advice}")
    count, crc = meta["tokens"], meta["crc32"]
    if not tokens_path.is_file():
        return f"token cache {tokens_path} is missing (its {meta_path.name} exists){advice}"
    size = tokens_path.stat().st_size
    if size != 4 * count:
        return f"token cache {tokens_path} has {size} bytes, {meta_path.name} says {4 * count}{advice}"
    if file_crc32(tokens_path) != crc:
        return f"token cache {tokens_path} does not match its CRC32 in {meta_path.name} (corrupt){advice}"
    return None


def build_if_missing(config: DataConfig, tokens_path: Path, meta_path: Path) -> None:
    """Build the cache unless it is complete. Under an exclusive lock on ``<key>.lock``: a run that finds
    another building the same cache waits for it (and then finds it complete), and the builder may remove
    the temporary files of a build that was killed midway (they can be as large as the cache)."""
    tokens_path.parent.mkdir(parents=True, exist_ok=True)
    with open(tokens_path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
        if meta_path.is_file():
            return
        for stale in (*tokens_path.parent.glob(f"{tokens_path.name}.tmp*"),
                      *meta_path.parent.glob(f"{meta_path.name}.tmp*")):
            stale.unlink(missing_ok=True)
        print(f"tokenizing the corpus into {tokens_path} (once; later runs reuse it)", flush=True)
        _build(config, tokens_path, meta_path)


def prepare(config: DataConfig, rank: int) -> None:
    """Rank 0 builds the cache if it is missing and checks it either way; every rank gets the same verdict.

    Every rank of the default group calls this (after joining it)."""
    tokens_path, meta_path = cache_paths(config)
    problem = None
    if rank == 0:
        try:
            build_if_missing(config, tokens_path, meta_path)
            problem = verify(tokens_path, meta_path)
        except ConfigError as exc:
            problem = str(exc)
        except OSError as exc:
            problem = f"data.cache_dir: cannot write the token cache {tokens_path}: {exc}"
        except Exception as exc:  # anything else must still reach the waiting ranks, or they wait for a day
            problem = f"data.tokenizer: tokenizing the corpus failed on rank 0: {type(exc).__name__}: {exc}"
    waiting = dist.new_group(backend="gloo", timeout=BUILD_TIMEOUT)
    verdict = [problem]
    dist.broadcast_object_list(verdict, src=0, group=waiting)
    dist.destroy_process_group(waiting)
    if verdict[0] is not None:
        raise ConfigError(verdict[0])


def check_vocabulary(config: DataConfig, meta: dict, vocab_size: int) -> None:
    """The cache's token ids (its largest id and EOS, recorded when it was built) index the model's ``vocab_size``
    embedding rows; ConfigError naming the cache otherwise (before a step fails with an index error)."""
    tokens_path, _ = cache_paths(config)
    largest = max(meta["max_token"], meta["eos"])
    if largest >= vocab_size:
        built_with = meta.get("tokenizer")
        other = f" (it was built with tokenizer {built_with!r})" if built_with != str(config.tokenizer) else ""
        raise ConfigError(f"data.tokenizer: the token cache {tokens_path} holds token ids up to {largest}, beyond "
                          f"the {vocab_size} rows of the model's embedding{other}: a cache of another tokenizer or a "
                          f"model of a smaller vocabulary; delete the cache files to rebuild them with "
                          f"data.tokenizer {config.tokenizer!r}, or use the model's own tokenizer")


def load(config: DataConfig) -> Tuple[torch.Tensor, dict, str]:
    """The cached token stream (int32, memory-mapped), its metadata, and a fingerprint naming it."""
    tokens_path, meta_path = cache_paths(config)
    meta = json.loads(meta_path.read_text())
    stream = torch.from_file(str(tokens_path), shared=False, size=meta["tokens"], dtype=torch.int32)
    return stream, meta, f"{tokens_path.stem[:8]}{meta['crc32']:08x}"
