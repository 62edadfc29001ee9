"""Functions run on every rank of an in-process test world (module level, so spawn can pickle them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist

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

    def corrupt():
        shard = next(last.glob("*.distcp"))
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the CRC can tell
        shard.write_bytes(bytes(data))

    _on_rank0_then_sync(rank, corrupt)
    corrupted = _error_of(lambda: trainer.train(trainer.setup(
        _config(config_path, base / "resumed", ("checkpoint.resume", "true"), ("train.steps", "9")))),
        checkpoint.CheckpointError)
    return {"resumed_steps": [r["step"] for r in resumed], "refused": refused, "corrupted": corrupted}


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


def all_scenarios(rank: int, world_size: int, config_path: Path, base: Path) -> dict:
    """Every scenario in one world: starting CPU ranks costs more than the scenarios themselves."""
    return {"resume": resume_refuse_corrupt(rank, world_size, config_path, base),
            "check": check_pass_and_fail(rank, world_size, config_path, base),
            "other_meshes": check_other_meshes(rank, world_size, config_path, base)}
