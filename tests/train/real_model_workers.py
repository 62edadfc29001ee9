"""Run on every rank of the 2-rank world of test_real_models.py (module level, so spawn can pickle them)."""

from __future__ import annotations

from pathlib import Path

from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ring_flash_attn.train import trainer
from ring_flash_attn.train.config import load_config

from .fsdp_workers import losses_and_gradients


def initial_weights(config_path: Path, log_dir: Path, *overrides) -> dict:
    """The sharded model's weights right after loading, gathered whole (numpy, rank 0; None elsewhere)."""
    run = trainer.setup(load_config(str(config_path), [("log.dir", str(log_dir)), *overrides]))
    model = trainer.build_sharded_model(run)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: tensor.numpy() for name, tensor in full.items()} if run.rank == 0 else None


def all_scenarios(rank: int, world_size: int, config_path: Path, base: Path, pretrained_overrides: list) -> dict:
    return {
        "pretrained_weights": initial_weights(config_path, base / "pretrained_weights", *pretrained_overrides),
        "pretrained": losses_and_gradients(config_path, base / "pretrained", *pretrained_overrides),
    }
