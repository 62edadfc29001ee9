"""Run on every rank of the 2-rank world of test_real_models.py (module level, so spawn can pickle them)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
import torch.distributed as dist

from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ring_flash_attn.integrations.hf import gather_logits, shard_batch
from ring_flash_attn.train import checkpoint, trainer
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
    cache = next((base / "token_cache").glob("*.tokens"))
    original = cache.read_bytes()
    dist.barrier()
    if rank == 0:
        data = bytearray(original)
        data[len(data) // 2] ^= 0xFF
        cache.write_bytes(bytes(data))
    dist.barrier()
    try:
        trainer.setup(load_config(str(config_path), [("log.dir", str(base / "tokenized_corrupt")),
                                                     *tokenizer_overrides]))
        corrupt = None
    except ConfigError as exc:
        corrupt = str(exc)
    dist.barrier()
    if rank == 0:
        cache.write_bytes(original)  # for the scenarios after this one
    dist.barrier()
    return {"runs": runs, "corrupt": corrupt}


def trained_for_export(rank: int, config_path: Path, base: Path, overrides: list) -> dict:
    """Two steps on 2 ranks, a checkpoint, and the sharded model's own logits (ring attention, gathered) on the
    first sequence: what the exported model must reproduce."""
    run = trainer.setup(load_config(str(config_path), [("log.dir", str(base / "export_run")), *overrides]))
    model = trainer.build_sharded_model(run)
    optimizer = trainer.make_optimizer(model, run.config)
    for step in range(2):
        trainer._step(run, model, optimizer, step)
    checkpoint.save(run.config.checkpoint_dir(), trainer._train_state(run, 2), model, optimizer, run.device, 1,
                    run.config.to_dict())
    full = run.dataset.batch([0])
    variant, group = run.config.parallel.variant, run.mesh.cp_group
    local = shard_batch(full.input_ids, None, full.position_ids, variant=variant, group=group)
    with torch.no_grad():
        logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits
        logits = gather_logits(logits, variant=variant, group=group)
    return {"input_ids": full.input_ids.numpy(), "logits": logits.numpy() if rank == 0 else None}


def all_scenarios(rank: int, world_size: int, config_path: Path, base: Path, pretrained_overrides: list,
                  tokenizer_overrides: list, document_overrides: list) -> dict:
    return {
        "documents": losses_and_gradients(config_path, base / "documents", *document_overrides),
        "pretrained_weights": initial_weights(config_path, base / "pretrained_weights", *pretrained_overrides),
        "pretrained": losses_and_gradients(config_path, base / "pretrained", *pretrained_overrides),
        "tokenized": tokenized_runs(rank, config_path, base, tokenizer_overrides),
        "export": trained_for_export(rank, config_path, base, tokenizer_overrides),
    }
