"""Run on every rank of the 4-rank world of test_fsdp.py (module level, so spawn can pickle them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ring_flash_attn.train import checkpoint, trainer
from ring_flash_attn.train.config import load_config
from ring_flash_attn.train.fsdp import local_state_bytes
from ring_flash_attn.train.model import _plain_name

STEPS = 3
TIED = ("model.extra", "{tie_word_embeddings: true}")  # the output projection is the input embedding


def losses_and_gradients(config_path: Path, log_dir: Path, *overrides) -> dict:
    """The first STEPS steps of a sharded run: losses, and (rank 0) every parameter's full gradient per step."""
    run = trainer.setup(load_config(str(config_path), [("log.dir", str(log_dir)), *overrides]))
    model = trainer.build_sharded_model(run)
    optimizer = trainer.make_optimizer(model, run.config)
    losses, gradients, graphs = [], [], []
    for step in range(STEPS):
        losses.append(trainer._step(run, model, optimizer, step)[0])
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        # full_tensor is a collective. numpy arrays travel to the parent by value (tensors would go through
        # shared memory that dies with this process).
        full = {_plain_name(name): p.grad.full_tensor().numpy() for name, p in model.named_parameters()}
        gradients.append(full if run.rank == 0 else None)
    state_bytes = local_state_bytes(model, optimizer)
    return {"losses": losses, "gradients": gradients, "state_bytes": state_bytes, "graphs_compiled": graphs}


def all_scenarios(rank: int, world_size: int, config_path: Path, base: Path) -> dict:
    torch.manual_seed(1234 + rank)  # ranks must not depend on agreeing RNGs: rank 0's weights are broadcast
    results = {
        "dp2_cp2": losses_and_gradients(config_path, base / "dp2_cp2", ("parallel.cp", "2")),
        "cp4": losses_and_gradients(config_path, base / "cp4", ("parallel.cp", "4")),
        "cp4_checkpointed": losses_and_gradients(config_path, base / "cp4_ac", ("parallel.cp", "4"),
                                                 ("train.activation_checkpointing", "full")),
        "cp4_every_2nd": losses_and_gradients(config_path, base / "cp4_ac2", ("parallel.cp", "4"),
                                              ("train.activation_checkpointing", "every_n"),
                                              ("train.activation_checkpointing_n", "2")),
        "hybrid": losses_and_gradients(config_path, base / "hybrid", ("parallel.cp", "2"),
                                       ("parallel.fsdp_replicate", "2")),
        # USP: Ulysses over pairs of ranks inside the cp group, the ring across the pairs.
        "ulysses2_ring2": losses_and_gradients(config_path, base / "usp", ("parallel.cp", "4"),
                                               ("parallel.ulysses", "2")),
    }
    # A run at dp2 x cp2 with checkpoints every 3 of 6 steps, for test_fsdp's resume on 2 ranks.
    trainer.train(trainer.setup(load_config(str(config_path), [("log.dir", str(base / "resize")),
                                                               ("parallel.cp", "2")])))
    return results


def two_rank_scenarios(rank: int, world_size: int, config_path: Path, base: Path) -> dict:
    """Resume the 4-rank run on 2 ranks; compile (aot_eager: Dynamo and AOTAutograd, no code generation, which
    would cost a minute of CI per world) against eager."""
    results = {"resumed": resume_on_two_ranks(rank, config_path, base)}
    results["eager"] = losses_and_gradients(config_path, base / "eager", ("parallel.cp", "2"))
    results["compiled"] = losses_and_gradients(config_path, base / "compiled", ("parallel.cp", "2"),
                                               ("train.compile", "true"), ("train.compile_backend", "aot_eager"))
    results["tied"] = losses_and_gradients(config_path, base / "tied", ("parallel.cp", "2"), TIED)
    return results


def resume_on_two_ranks(rank: int, config_path: Path, base: Path) -> list:
    """Continue the 4-rank run from its step-3 checkpoint on 2 ranks (cp2, grad_accum 2: the same global batch)."""
    last = base / "resize" / "checkpoints" / checkpoint.checkpoint_name(6)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(last)
    dist.barrier()
    config = load_config(str(config_path), [("log.dir", str(base / "resize")), ("parallel.cp", "2"),
                                            ("train.grad_accum", "2"), ("checkpoint.resume", "true")])
    return [r["loss"] for r in trainer.train(trainer.setup(config))]
