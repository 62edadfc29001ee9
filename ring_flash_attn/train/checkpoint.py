"""Checkpoints with ``torch.distributed.checkpoint`` that are either complete or ignored, never half-read.

A checkpoint is a directory ``step_00000040`` holding:

* the DCP files of the model and the optimizer (each replicated tensor written once),
* ``rng_rank00000.pt`` ... one per rank: that rank's RNG states,
* ``train_state.json``: step, data position, data fingerprint, mesh shape,
* ``run_config.json``: the run's config; ``config.json``: the model's transformers config (``ring-attn
  export`` rebuilds the model from it, without the pretrained directory the run started from),
* ``manifest.json``: size and CRC32 of every other file, written last.

Saving writes into ``step_00000040.partial`` and renames it only once every
rank's files and the manifest are on disk, so a crash mid-save leaves a
``.partial`` directory that is never loaded (and is removed by the next save),
and an existing checkpoint is never overwritten. Loading checks the manifest
(on rank 0, verdict shared with every rank) before DCP reads a byte, so a
corrupt checkpoint fails on every rank with the same message.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .files import file_crc32

MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.json"
RUN_CONFIG = "run_config.json"  # the run config that wrote it
MODEL_CONFIG = "config.json"    # the model's transformers config: what `ring-attn export` rebuilds the model from
PARTIAL_SUFFIX = ".partial"
_NAME = re.compile(r"^step_(\d{8})$")
DAMAGED = "; the checkpoint is damaged: move it out of the checkpoint directory to resume from the one before"


class CheckpointError(RuntimeError):
    pass


@dataclass
class TrainState:
    step: int                 # optimizer steps completed
    samples_consumed: int     # data position: the next sample index is this
    data_fingerprint: str     # the packed corpus this run reads; resuming on other data is refused
    dp_size: int
    cp_size: int


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type != "cpu":
        state["device"] = getattr(torch, device.type).get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type != "cpu" and "device" in state:
        getattr(torch, device.type).set_rng_state(state["device"], device)


def list_checkpoints(root: Path) -> List[Tuple[int, Path]]:
    """Every ``step_N`` directory under ``root`` (complete or not: that is for ``verify`` to say), by step."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def _manifest_files(manifest) -> Optional[dict]:
    """The ``files`` of a manifest of this trainer's shape, or None: {"files": {name: {"size": int, "crc32":
    int}}}, every name a plain file name (never a path out of the checkpoint)."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or TRAIN_STATE not in files:
        return None
    for name, entry in files.items():
        if Path(name).name != name or name in ("", ".", "..") or not isinstance(entry, dict):
            return None
        if not all(type(entry.get(key)) is int for key in ("size", "crc32")):
            return None
    return files


def verify(path: Path, check_crc: bool, names: Optional[Tuple[str, ...]] = None) -> Optional[str]:
    """Why ``path`` is not a loadable checkpoint, or None when it is (``names``: check only these files)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return (f"checkpoint {path}: no {MANIFEST}, so it was never completed (an interrupted copy?); move it out of "
                f"the checkpoint directory to resume from the one before")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, OSError) as exc:
        return f"checkpoint {path}: {MANIFEST} is unreadable ({exc}){DAMAGED}"
    files = _manifest_files(manifest)
    if files is None:
        return (f"checkpoint {path}: {MANIFEST} is not a manifest of ring-attn train (expected {{\"files\": "
                f"{{name: {{\"size\": int, \"crc32\": int}}}}}} listing {TRAIN_STATE}){DAMAGED}")
    for name in files if names is None else names:
        if name not in files:
            return f"checkpoint {path}: {MANIFEST} does not list {name}{DAMAGED}"
        expected, file = files[name], path / name
        if not file.is_file():
            return f"checkpoint {path}: file {name} is missing{DAMAGED}"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"checkpoint {path}: file {name} has {size} bytes, the manifest says {expected['size']}{DAMAGED}"
        if check_crc and file_crc32(file) != expected["crc32"]:
            return f"checkpoint {path}: file {name} does not match its CRC32 in the manifest (corrupt){DAMAGED}"
    return None


def read_train_state(path: Path) -> TrainState:
    """The TrainState saved in checkpoint ``path``, or CheckpointError naming the file and what is wrong."""
    file = path / TRAIN_STATE
    try:
        fields = json.loads(file.read_text())
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path}: {TRAIN_STATE} is unreadable ({type(exc).__name__}: "
                              f"{exc}){DAMAGED}") from None
    kinds = {f.name: str if f.type in (str, "str") else int for f in dataclasses.fields(TrainState)}
    if (not isinstance(fields, dict) or set(fields) != set(kinds)
            or any(type(fields[name]) is not kind for name, kind in kinds.items())):
        raise CheckpointError(f"checkpoint {path}: {TRAIN_STATE} does not hold the fields {sorted(kinds)} with "
                              f"their types (got {str(fields)[:120]}){DAMAGED}")
    return TrainState(**fields)


def _model_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def save(root: Path, state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
         keep: int, run_config: dict) -> Path:
    """Write checkpoint ``step_<state.step>`` under ``root``; every rank calls this. Returns its path.

    Any failure (an unwritable directory, a full disk, DCP's ``CheckpointException``, which is a
    ``BaseException``) on any rank becomes the same CheckpointError on every rank, naming each failing rank's
    cause; the ``.partial`` directory is left for the next save to remove and every complete checkpoint is
    left as it was. A peer that dies or stops answering during the save is a CheckpointError too (gloo would say
    only "Connection reset by peer").
    """
    try:
        return _save(root, state, model, optimizer, device, keep, run_config)
    except CheckpointError:
        raise
    except RuntimeError as exc:  # a collective of the save failed: some rank died or stopped answering
        raise CheckpointError(f"checkpoint {root / checkpoint_name(state.step)} not saved: rank {dist.get_rank()} "
                              f"lost a peer during the save ({' '.join(str(exc).split())[:300]}); the checkpoints "
                              f"already saved are intact: continue from the last with --resume") from exc


def _save(root: Path, state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
          keep: int, run_config: dict) -> Path:
    rank = dist.get_rank()
    final = root / checkpoint_name(state.step)
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    # Never a non-finite state: it would resume into NaNs, and `keep` would delete a good checkpoint for it.
    _raise_if_any_rank_failed(_nonfinite_parameter(model), f"checkpoint {final} not saved")
    problem = None
    if rank == 0:
        if final.exists():
            problem = f"checkpoint {final} already exists; refusing to overwrite it"
        else:
            try:
                shutil.rmtree(partial, ignore_errors=True)  # left by a crash during an earlier save
                partial.mkdir(parents=True)
            except OSError as exc:
                problem = f"checkpoint {final} not saved: rank 0: cannot create {partial}: {_cause(exc)}"
    _raise_on_every_rank(problem)

    try:
        dcp.save(_model_optimizer_state(model, optimizer), checkpoint_id=str(partial))
        torch.save(_rng_state(device), partial / f"rng_rank{rank:05d}.pt")
        failure = None
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        failure = _cause(exc)
    _raise_if_any_rank_failed(failure, f"checkpoint {final} not saved")
    if rank == 0:
        try:
            _complete(root, partial, final, state, keep, run_config, model.config.to_json_string())
        except OSError as exc:
            problem = f"checkpoint {final} not saved: rank 0: completing {partial}: {_cause(exc)}"
    _raise_on_every_rank(problem)
    return final


def _nonfinite_parameter(model: nn.Module) -> Optional[str]:
    """Why this rank's shards of the parameters cannot be saved (the first holding NaN or inf), or None."""
    with torch.no_grad():
        params = [(name, p.to_local() if hasattr(p, "to_local") else p) for name, p in model.named_parameters()]
        finite = torch.stack([t.isfinite().all() for _, t in params]).tolist() if params else []
    for (name, _), ok in zip(params, finite):
        if not ok:
            return (f"parameter {name} holds NaN or infinite values; the checkpoints already saved are kept as "
                    f"they are")
    return None


def _complete(root: Path, partial: Path, final: Path, state: TrainState, keep: int, run_config: dict,
              model_config_json: str) -> None:
    """Rank 0, once every rank's files are written: train state, run config, manifest, rename, then drop old
    checkpoints."""
    (partial / TRAIN_STATE).write_text(json.dumps(asdict(state), indent=1))
    (partial / RUN_CONFIG).write_text(json.dumps(run_config, indent=1))
    (partial / MODEL_CONFIG).write_text(model_config_json)
    files = {p.name: {"size": p.stat().st_size, "crc32": file_crc32(p)} for p in sorted(partial.iterdir())}
    for name in files:  # the data must be durable before the rename makes the checkpoint visible
        with open(partial / name, "rb") as handle:
            os.fsync(handle.fileno())
    (partial / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
    with open(partial / MANIFEST, "rb") as handle:
        os.fsync(handle.fileno())
    os.rename(partial, final)
    _fsync_dir(root)
    for _, old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)


def _cause(exc: BaseException) -> str:
    """One line naming the real cause: DCP's CheckpointException wraps each failing rank's exception."""
    if isinstance(exc, CheckpointException):
        return "; ".join(f"rank {r}: {_cause(inner)}" for r, (inner, _) in sorted(exc.failures.items()))
    return f"{type(exc).__name__}: {exc}"


def _raise_if_any_rank_failed(failure: Optional[str], context: str) -> None:
    """Every rank says what failed on it (None: nothing); if any rank failed, every rank raises the same error."""
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    distinct = sorted({f for f in failures if f is not None})
    if len(distinct) == 1 and failures.count(distinct[0]) == len(failures):  # DCP reports alike on every rank
        raise CheckpointError(f"{context}: {distinct[0]}")
    if distinct:
        raise CheckpointError(f"{context}: " + "; ".join(f"rank {r}: {f}" for r, f in enumerate(failures) if f))


def _raise_on_every_rank(problem: Optional[str]) -> None:
    """Share rank 0's verdict (None or a message) so every rank raises the same error or none does."""
    box = [problem]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise CheckpointError(box[0])


def latest(root: Path) -> Optional[Path]:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1][1] if checkpoints else None


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, check_crc: bool,
         expected: TrainState) -> TrainState:
    """Restore model, optimizer and this rank's RNG from ``path``; every rank calls this.

    ``expected`` carries this run's mesh shape and data fingerprint (its step fields are ignored): a checkpoint
    of other data is refused; one from another mesh is resharded (it continues within rounding, not bit for
    bit: sums run in another order).
    """
    verdict = [None, None]  # rank 0's (problem, train state): every rank raises the same error or none does
    if dist.get_rank() == 0:
        verdict[0] = verify(path, check_crc)
        if verdict[0] is None:
            try:
                verdict[1] = read_train_state(path)
            except CheckpointError as exc:
                verdict[0] = str(exc)
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise CheckpointError(verdict[0])
    state = verdict[1]
    if state.data_fingerprint != expected.data_fingerprint:
        raise CheckpointError(f"checkpoint {path}: written for data {state.data_fingerprint}, this run reads "
                              f"{expected.data_fingerprint} (other data or seq_len); resume with the same data")
    target = _model_optimizer_state(model, optimizer)
    try:
        dcp.load(target, checkpoint_id=str(path))  # DCP reshards when the mesh differs from the one that saved
    except CheckpointException as exc:  # a BaseException: it would escape every `except Exception`
        raise CheckpointError(f"checkpoint {path}: loading failed: {_cause(exc)}") from None
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    if (state.dp_size, state.cp_size) == (expected.dp_size, expected.cp_size):
        # Our own file (listed in the verified manifest); it holds Python's RNG tuple, which needs the full
        # unpickler. On another mesh the ranks' RNG streams have no counterpart: they continue as seeded.
        _set_rng_state(torch.load(path / f"rng_rank{dist.get_rank():05d}.pt", weights_only=False), device)
    return state
