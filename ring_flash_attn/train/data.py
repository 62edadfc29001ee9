"""Byte-level training data that needs no download: a corpus, packed into sequences, in a seeded order.

Tokens are bytes (0-255) plus one special, end-of-document (256), so any text
works with no tokenizer files. The default corpus is this Python's own standard
library sources, present on every machine that can run the trainer; ``data.path``
reads the user's text or JSONL files instead.

Documents are concatenated (each followed by EOS) and cut into sequences of
``seq_len + 1`` tokens: inputs are the first ``seq_len``, labels the last
``seq_len`` (the shift happens on the full sequence, before any
context-parallel split). Every position is a target, so a step's token count is
known without communication. The order of sequences is a seeded permutation per
epoch, and sample ``i`` of the run is a pure function of ``i``: the data
position in a checkpoint is just the step.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Tuple

import torch

from .config import ConfigError, DataConfig

EOS = 256
VOCAB_SIZE = 257
IGNORE_INDEX = -100  # cross-entropy's label for "no target here"


@functools.lru_cache(maxsize=1)
def _stdlib_paths() -> Tuple[Path, ...]:
    """This interpreter's standard-library ``.py`` files in sorted path order (the same on every rank).

    Cached: walking the stdlib takes most of a second, and a process that builds several runs needs it once.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = tuple(sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts))
    if not paths:
        raise ConfigError(f"data.source stdlib: found no .py files under {root}")
    return paths


def _stdlib_documents(max_bytes: int) -> Iterator[bytes]:
    yield from _read_until(_stdlib_paths(), max_bytes)


def _read_until(paths: Iterable[Path], max_bytes: int) -> Iterator[bytes]:
    total = 0
    for path in paths:
        if total >= max_bytes:
            return
        data = path.read_bytes()[: max_bytes - total]
        total += len(data)
        yield data


def _user_paths(path: str, fmt: str) -> List[Path]:
    """The files ``data.path`` names: one file, every file under a directory, or a glob's matches; sorted."""
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return [candidate]
    if candidate.is_dir():
        suffix = {"jsonl": ".jsonl", "parquet": ".parquet"}.get(fmt, "")
        found = sorted(p for p in candidate.rglob("*") if p.is_file() and p.name.endswith(suffix)
                       and not p.name.startswith("."))
        if not found:
            raise ConfigError(f"data.path: directory {str(candidate)!r} holds no {fmt} files")
        return found
    matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(path), recursive=True) if Path(p).is_file())
    if not matches:
        raise ConfigError(f"data.path: no such file, directory or glob match: {path!r}")
    return matches


def _jsonl_documents(paths: List[Path], text_key: str, max_bytes: int) -> Iterator[bytes]:
    total = 0
    for path in paths:
        with open(path, "rb") as handle:
            for line_number, line in enumerate(handle, 1):
                if total >= max_bytes:
                    return
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"data.path: {path}:{line_number} is not valid JSON: {exc.msg}") from None
                except UnicodeDecodeError as exc:  # JSON text is UTF-8 (json.loads of bytes decodes it)
                    raise ConfigError(f"data.path: {path}:{line_number} is not UTF-8 text (byte "
                                      f"{exc.object[exc.start]:#04x} at column {exc.start + 1}): JSON lines must be "
                                      f"UTF-8; re-encode the file") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                    raise ConfigError(f"data.text_key: {path}:{line_number} has no string field {text_key!r}")
                data = record[text_key].encode("utf-8")[: max_bytes - total]
                total += len(data)
                yield data


def _texts_until(texts: Iterable, where: str, text_key: str, max_bytes: int) -> Iterator[bytes]:
    total = 0
    for index, text in enumerate(texts):
        if total >= max_bytes:
            return
        if not isinstance(text, str):
            raise ConfigError(f"data.text_key: {where} row {index} has no string field {text_key!r}")
        data = text.encode("utf-8")[: max_bytes - total]
        total += len(data)
        yield data


def _parquet_documents(paths: List[Path], text_key: str, max_bytes: int) -> Iterator[bytes]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("data.format parquet needs pyarrow: pip install pyarrow") from None
    budget = max_bytes
    for path in paths:
        try:
            table = pq.read_table(path, columns=[text_key])
        except (KeyError, ValueError, OSError) as exc:
            raise ConfigError(f"data.path: {path}: cannot read column {text_key!r} (data.text_key): "
                              f"{str(exc).splitlines()[0]}") from None
        for data in _texts_until(table.column(text_key).to_pylist(), str(path), text_key, budget):
            budget -= len(data)
            yield data
        if budget <= 0:
            return


def _hf_dataset_documents(path: str, text_key: str, max_bytes: int) -> Iterator[bytes]:
    """A dataset written by ``datasets``' ``save_to_disk`` (a Dataset, or the "train" split of a DatasetDict)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.format hf_dataset needs datasets: pip install datasets") from None
    try:
        dataset = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"data.path: {path!r} is not a dataset saved with save_to_disk: "
                          f"{str(exc).splitlines()[0]}") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ConfigError(f"data.path: {path!r} holds splits {sorted(dataset)}, none called 'train'")
        dataset = dataset["train"]
    if text_key not in dataset.column_names:
        raise ConfigError(f"data.text_key: {path!r} has no column {text_key!r}; columns: {dataset.column_names}")
    return _texts_until((row[text_key] for row in dataset), path, text_key, max_bytes)


def documents(config: DataConfig) -> Iterator[bytes]:
    """The corpus's documents as UTF-8 bytes, in a fixed order, up to ``data.max_bytes`` in all."""
    if config.source == "stdlib":
        return _stdlib_documents(config.max_bytes)
    if config.format == "hf_dataset":
        return _hf_dataset_documents(config.path, config.text_key, config.max_bytes)
    paths = _user_paths(config.path, config.format)
    if config.format == "jsonl":
        return _jsonl_documents(paths, config.text_key, config.max_bytes)
    if config.format == "parquet":
        return _parquet_documents(paths, config.text_key, config.max_bytes)
    return _read_until(paths, config.max_bytes)


def source_files(config: DataConfig) -> List[Path]:
    """Every file the corpus is read from (for the token cache's key)."""
    if config.source == "stdlib":
        return list(_stdlib_paths())
    if config.format == "hf_dataset":
        root = Path(config.path).expanduser()
        return sorted(p for p in root.rglob("*") if p.is_file())
    return _user_paths(config.path, config.format)


def pack(docs: Iterator[bytes]) -> torch.Tensor:
    """Every document's bytes followed by EOS, as one int16 token stream."""
    parts = []
    for doc in docs:
        parts.append(torch.frombuffer(bytearray(doc), dtype=torch.uint8).to(torch.int16) if doc else
                     torch.empty(0, dtype=torch.int16))
        parts.append(torch.tensor([EOS], dtype=torch.int16))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int16)


@dataclass
class Batch:
    """Full (unsplit) sequences: ``input_ids``, ``labels`` and ``position_ids``, each ``[batch, seq_len]``."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    # Document masking: the documents of the whole packed row, all context-parallel ranks' pieces together
    # (what the all-gather exchange needs before the forward); None otherwise.
    cu_seqlens: Optional[torch.Tensor] = None

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class PackedDataset:
    """Sequences of ``seq_len + 1`` tokens cut from a packed stream; sample ``i`` in a seeded per-epoch order."""

    def __init__(self, stream: torch.Tensor, seq_len: int, seed: int, fingerprint: Optional[str] = None,
                 eos: int = EOS):
        self.seq_len, self.seed, self.eos = seq_len, seed, eos
        self.num_sequences = stream.numel() // (seq_len + 1)
        if self.num_sequences < 1:
            raise ConfigError(f"data.seq_len: the corpus has {stream.numel()} tokens, fewer than one sequence of "
                              f"seq_len + 1 = {seq_len + 1}; give more data (data.max_bytes, data.path) or a "
                              f"shorter data.seq_len")
        self.sequences = stream[: self.num_sequences * (seq_len + 1)].view(self.num_sequences, seq_len + 1)
        # A token cache names its own fingerprint (hashing a multi-GB memory map at every start would cost more
        # than the check is worth).
        self.fingerprint = fingerprint or hashlib.sha256(self.sequences.numpy().tobytes()).hexdigest()[:16]
        self._epoch, self._order = -1, None

    @classmethod
    def from_config(cls, config: DataConfig) -> "PackedDataset":
        return cls(pack(documents(config)), config.seq_len, config.seed)

    def _order_for(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_sequences, generator=generator)
        return self._order

    def sample(self, index: int) -> torch.Tensor:
        """The run's ``index``-th sequence (int64, ``seq_len + 1`` tokens)."""
        epoch, within = divmod(index, self.num_sequences)
        return self.sequences[int(self._order_for(epoch)[within])].long()

    def batch(self, indices: List[int], document_mask: bool = False) -> Batch:
        """Full sequences ``indices``; with ``document_mask``, each document attends only within itself: its
        position ids restart at 0 after every EOS, and the prediction made at an EOS (the first token of an
        unrelated next document) is not a target (label -100)."""
        tokens = torch.stack([self.sample(i) for i in indices])
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        positions = torch.arange(self.seq_len).expand(len(indices), -1)
        if document_mask:
            positions = document_positions(inputs, self.eos)
            labels = labels.masked_fill(inputs == self.eos, IGNORE_INDEX)
        return Batch(inputs, labels, positions)


def document_positions(inputs: torch.Tensor, eos: int) -> torch.Tensor:
    """``[batch, seq]`` positions that restart at 0 on the token after each ``eos`` (a new document)."""
    starts = torch.zeros_like(inputs, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = inputs[:, :-1] == eos
    index = torch.arange(inputs.shape[1]).expand_as(inputs)
    last_start = torch.where(starts, index, 0).cummax(dim=1).values
    return index - last_start


def document_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """int32 cu_seqlens of the documents of ``position_ids`` rows laid one after the other (each row starts one)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    return torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)


@dataclass(frozen=True)
class BatchPlan:
    """Which samples each data-parallel replica takes at each micro-step: the sampler, with no state."""

    dp_size: int
    micro_batch_size: int
    grad_accum: int
    # Where a resumed run picks up: optimizer step ``first_step`` reads from sample ``first_sample`` on (the
    # checkpoint's data position, which a run on another mesh cannot derive from the step alone).
    first_step: int = 0
    first_sample: int = 0

    @property
    def samples_per_step(self) -> int:
        return self.dp_size * self.micro_batch_size * self.grad_accum

    def samples_before(self, step: int) -> int:
        """The data position when optimizer step ``step`` (0-based) starts."""
        return self.first_sample + (step - self.first_step) * self.samples_per_step

    def indices(self, step: int, micro_step: int, dp_rank: int) -> List[int]:
        """Sample indices for optimizer step ``step`` (0-based), micro-step ``micro_step``, replica ``dp_rank``."""
        first = self.samples_before(step) + (micro_step * self.dp_size + dp_rank) * self.micro_batch_size
        return list(range(first, first + self.micro_batch_size))

    def global_indices(self, step: int, micro_step: int) -> List[int]:
        """Every replica's samples at one micro-step, replica after replica (what one rank sees in --check)."""
        return [i for dp_rank in range(self.dp_size) for i in self.indices(step, micro_step, dp_rank)]
