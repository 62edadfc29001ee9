"""Functions run on every rank of an in-process test world (module level, so spawn can pickle them)."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from ring_flash_attn.train import checkpoint, trainer
from ring_flash_attn.train.config import load_config


def _config(config_path: Path, log_dir: Path, *overrides):
    return load_config(str(config_path), [("log.dir", str(log_dir)), *overrides])


def _on_rank0_then_sync(rank: int, action) -> None:
    dist.barrier()
    if rank == 0:
        action()
    dist.barrier()


def _error_of(fn, *errors):
    try:
        fn()
    except errors as exc:
        return str(exc)
    return None


def resume_refuse_corrupt(rank: int, world_size: int, config_path: Path, base: Path) -> dict:
    """An uninterrupted run, the same run resumed from its middle checkpoint, and the ways resuming must fail."""
    trainer.train(trainer.setup(_config(config_path, base / "straight")))

    trainer.train(trainer.setup(_config(config_path, base / "resumed")))
    last = base / "resumed" / "checkpoints" / checkpoint.checkpoint_name(6)
    _on_rank0_then_sync(rank, lambda: shutil.rmtree(last))  # as if the run had died after step 3's checkpoint
    resumed = trainer.train(trainer.setup(_config(config_path, base / "resumed", ("checkpoint.resume", "true"))))

    refused = _error_of(lambda: trainer.train(trainer.setup(_config(config_path, base / "resumed"))),
                        checkpoint.CheckpointError)

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # --resume on a run that has done all its steps
        again = trainer.train(trainer.setup(_config(config_path, base / "resumed", ("checkpoint.resume", "true"))))
    complete = {"records": again, "printed": printed.getvalue()}

    def corrupt():
        shard = next(last.glob("*.distcp"))
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the CRC can tell
        shard.write_bytes(bytes(data))

    _on_rank0_then_sync(rank, corrupt)
    corrupted = _error_of(lambda: trainer.train(trainer.setup(
        _config(config_path, base / "resumed", ("checkpoint.resume", "true"), ("train.steps", "9")))),
        checkpoint.CheckpointError)
    return {"resumed_steps": [r["step"] for r in resumed], "refused": refused, "corrupted": corrupted,
            "complete": complete}


def check_pass_and_fail(rank: int, world_size: int, config_path: Path, base: Path) -> dict:
    """--check with its default tolerance (must pass) and with one below float32 rounding (must fail)."""
    pairs = trainer.check(trainer.setup(_config(config_path, base / "check")))
    failed = _error_of(lambda: trainer.check(trainer.setup(_config(config_path, base / "check",
                                                                    ("check.rtol", "1e-12")))),
                       trainer.CheckFailed)
    return {"pairs": pairs, "failed": failed}


def check_other_meshes(rank: int, world_size: int, config_path: Path, base: Path) -> dict:
    """--check on pure data parallelism with gradient accumulation, and on bfloat16 autocast with cp=2."""
    data_parallel = trainer.check(trainer.setup(_config(config_path, base / "check_dp", ("parallel.cp", "1"),
                                                        ("train.grad_accum", "2"))))
    bf16 = trainer.check(trainer.setup(_config(config_path, base / "check_bf16", ("train.precision", "bf16"))))
    return {"data_parallel": data_parallel, "bf16": bf16}


def save_failures(rank: int, world_size: int, config_path: Path, base: Path) -> dict:
    """Each way a save can fail, at step 6 of a run resumed from its step-3 checkpoint: the error every rank
    raises, the checkpoints left; then a resume from step 3 that must finish as the uninterrupted run."""
    log_dir = base / "save_failures"
    trainer.train(trainer.setup(_config(config_path, log_dir, ("train.steps", "3"))))

    def mkdir_denied_on_rank0(self, *args, **kwargs):
        if rank == 0 and self.name.endswith(checkpoint.PARTIAL_SUFFIX):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    def disk_full_in_dcp(*args, **kwargs):  # what DCP raises on every rank when one rank's write fails
        raise CheckpointException("save failed", {1: (OSError(28, "No space left on device"), None)})

    def rank1_cannot_write(obj, path, *args, **kwargs):
        if rank == 1:
            raise OSError(28, "No space left on device", str(path))
        return real_torch_save(obj, path, *args, **kwargs)

    real_mkdir, real_torch_save = Path.mkdir, torch.save
    injected = {"unwritable": mock.patch.object(Path, "mkdir", mkdir_denied_on_rank0),
                "dcp_base_exception": mock.patch.object(checkpoint.dcp, "save", disk_full_in_dcp),
                "one_rank_fails": mock.patch.object(checkpoint.torch, "save", rank1_cannot_write)}
    errors, left = {}, {}
    for name, patch in injected.items():
        with patch:
            errors[name] = _error_of(lambda: trainer.train(trainer.setup(
                _config(config_path, log_dir, ("checkpoint.resume", "true")))), checkpoint.CheckpointError)
        left[name] = [p.name for _, p in checkpoint.list_checkpoints(log_dir / "checkpoints")]
    resumed = trainer.train(trainer.setup(_config(config_path, log_dir, ("checkpoint.resume", "true"))))
    return {"errors": errors, "left": left, "resumed_steps": [r["step"] for r in resumed]}


def all_scenarios(rank: int, world_size: int, config_path: Path, base: Path) -> dict:
    """Every scenario in one world: starting CPU ranks costs more than the scenarios themselves."""
    return {"save_failures": save_failures(rank, world_size, config_path, base),
            "resume": resume_refuse_corrupt(rank, world_size, config_path, base),
            "check": check_pass_and_fail(rank, world_size, config_path, base),
            "other_meshes": check_other_meshes(rank, world_size, config_path, base)}
