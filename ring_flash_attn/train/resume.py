"""Resuming a run: the model a checkpoint holds, and what the resumed run changes.

A checkpoint holds every weight and its model's transformers config (``config.json``), so a resumed run
builds its model from the checkpoint: the pretrained directory it started from is not read (it may have
moved) and no rank loads weights the checkpoint would overwrite. The model itself cannot change on resume
(``model.*`` keys other than the pretrained directory's path are compared with the checkpoint's run); the
schedule and the batch can, and the run says so in one line each, since both change what it computes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, List, Optional

from . import checkpoint
from .config import ConfigError, RunConfig

# The keys the learning rate at a step depends on (trainer.learning_rate).
SCHEDULE_KEYS = ("steps", "lr", "warmup_steps", "min_lr_ratio")


def resume_point(config: RunConfig) -> Optional[Path]:
    """The checkpoint a run with ``checkpoint.resume`` builds its model from: the newest in checkpoint.dir, when
    it holds its model's config (older checkpoints do not: then the model comes from model.pretrained as in a
    new run, and the checkpoint's weights replace it)."""
    if not config.checkpoint.resume:
        return None
    found = checkpoint.latest(config.checkpoint_dir())
    if found is None or not (found / checkpoint.MODEL_CONFIG).is_file():
        return None
    # The model is built from these two before the whole checkpoint is verified (at load): check them now.
    problem = checkpoint.verify(found, check_crc=True, names=(checkpoint.MODEL_CONFIG, checkpoint.RUN_CONFIG))
    if problem is not None:
        raise checkpoint.CheckpointError(problem)
    return found


def saved_run_config(path: Path) -> dict:
    """The run config a checkpoint was written with (its ``to_dict()`` form), or CheckpointError."""
    file = path / checkpoint.RUN_CONFIG
    try:
        saved = json.loads(file.read_text())
    except (ValueError, OSError) as exc:
        raise checkpoint.CheckpointError(f"checkpoint {path}: {checkpoint.RUN_CONFIG} is unreadable "
                                         f"({type(exc).__name__}: {exc}){checkpoint.DAMAGED}") from None
    if not isinstance(saved, dict) or not all(isinstance(saved.get(s), dict) for s in ("model", "train")):
        raise checkpoint.CheckpointError(f"checkpoint {path}: {checkpoint.RUN_CONFIG} does not hold a run "
                                         f"config{checkpoint.DAMAGED}")
    return saved


def check_same_model(config: RunConfig, path: Path) -> None:
    """A resumed run keeps its model: ConfigError naming the first ``model.*`` key (other than the pretrained
    directory's path) that differs from the checkpoint's run."""
    saved = saved_run_config(path)["model"]
    current = dataclasses.asdict(config.model)
    for key in sorted(set(saved) & set(current) - {"pretrained"}):
        if saved[key] != current[key]:
            raise ConfigError(f"config key model.{key}: the checkpoint {path} was written with {saved[key]!r}, this "
                              f"run asks for {current[key]!r}; a resumed run keeps its model: drop the change, or "
                              f"start a new run in another log.dir")


def changes(path: Path, state: checkpoint.TrainState, config: RunConfig, samples_per_step: int, dp_size: int,
            learning_rate: Callable[[RunConfig, int], float]) -> List[str]:
    """One line for each thing the resumed run computes differently from the run that wrote ``path``: the
    learning-rate schedule (train.steps, lr, warmup_steps, min_lr_ratio), the order of the data (data.seed),
    document masking, and the global batch. (Other data, or another seq_len, is refused at load.)"""
    saved = saved_run_config(path)["train"]
    notes = []
    changed = [k for k in SCHEDULE_KEYS if k in saved and saved[k] != getattr(config.train, k)]
    if changed:
        before = dataclasses.replace(config, train=dataclasses.replace(
            config.train, **{k: saved[k] for k in SCHEDULE_KEYS if k in saved}))
        step = state.step
        notes.append(f"resume: {', '.join(f'train.{k} {saved[k]} -> {getattr(config.train, k)}' for k in changed)}: "
                     f"the learning-rate schedule changes from step {step + 1} on (lr {learning_rate(config, step):.3g}"
                     f" there, {learning_rate(before, step):.3g} in the run that wrote the checkpoint)")
    saved_data = saved_run_config(path).get("data", {})
    if "seed" in saved_data and saved_data["seed"] != config.data.seed:
        notes.append(f"resume: data.seed {saved_data['seed']} -> {config.data.seed}: the sequences come in another "
                     f"order from here on, so within this epoch some the run has seen come again and some it has "
                     f"not seen are left out")
    if "document_mask" in saved_data and saved_data["document_mask"] != config.data.document_mask:
        notes.append(f"resume: data.document_mask {saved_data['document_mask']} -> {config.data.document_mask}: "
                     f"documents {'no longer ' if saved_data['document_mask'] else ''}attend only within "
                     f"themselves from here on (another loss than the checkpoint's run)")
    saved_batch = state.dp_size * saved.get("micro_batch_size", 0) * saved.get("grad_accum", 0)
    if saved_batch and saved_batch != samples_per_step:
        per_micro_step = dp_size * config.train.micro_batch_size
        keep = (f"; --train.grad_accum {saved_batch // per_micro_step} keeps it"
                if saved_batch % per_micro_step == 0 else "")
        notes.append(f"resume: the global batch changes from {saved_batch} sequences per step (dp {state.dp_size} x "
                     f"micro_batch_size {saved['micro_batch_size']} x grad_accum {saved['grad_accum']}) to "
                     f"{samples_per_step} (dp {dp_size} x micro_batch_size {config.train.micro_batch_size} x "
                     f"grad_accum {config.train.grad_accum}){keep}")
    return notes
