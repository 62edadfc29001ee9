"""Run on every rank of the 2-rank world of test_real_models.py (module level, so spawn can pickle them)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch.distributed as dist

from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ring_flash_attn.train import trainer
from ring_flash_attn.train.config import ConfigError, load_config

from .fsdp_workers import losses_and_gradients


def initial_weights(config_path: Path, log_dir: Path, *overrides) -> dict:
    """The sharded model's weights right after loading, gathered whole (numpy, rank 0; None elsewhere)."""
    run = trainer.setup(load_config(str(config_path), [("log.dir", str(log_dir)), *overrides]))
    model = trainer.build_sharded_model(run)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: tensor.numpy() for name, tensor in full.items()} if run.rank == 0 else None


def tokenized_runs(rank: int, config_path: Path, base: Path, tokenizer_overrides: list) -> dict:
    """Two runs on one tokenized corpus (rank 0 tokenizes it for the first; the second finds it), then the
    same run on a corrupted cache."""
    runs = []
    for name in ("tokenized_first", "tokenized_again"):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            records = trainer.train(trainer.setup(load_config(str(config_path), [
                ("log.dir", str(base / name)), *tokenizer_overrides])))
        runs.append({"losses": [r["loss"] for r in records], "printed": printed.getvalue()})
    dist.barrier()
    if rank == 0:
        cache = next((base / "token_cache").glob("*.tokens"))
        data = bytearray(cache.read_bytes())
        data[len(data) // 2] ^= 0xFF
        cache.write_bytes(bytes(data))
    dist.barrier()
    try:
        trainer.setup(load_config(str(config_path), [("log.dir", str(base / "tokenized_corrupt")),
                                                     *tokenizer_overrides]))
        corrupt = None
    except ConfigError as exc:
        corrupt = str(exc)
    return {"runs": runs, "corrupt": corrupt}


def all_scenarios(rank: int, world_size: int, config_path: Path, base: Path, pretrained_overrides: list,
                  tokenizer_overrides: list, document_overrides: list) -> dict:
    return {
        "documents": losses_and_gradients(config_path, base / "documents", *document_overrides),
        "pretrained_weights": initial_weights(config_path, base / "pretrained_weights", *pretrained_overrides),
        "pretrained": losses_and_gradients(config_path, base / "pretrained", *pretrained_overrides),
        "tokenized": tokenized_runs(rank, config_path, base, tokenizer_overrides),
    }
