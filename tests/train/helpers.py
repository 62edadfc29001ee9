"""Shared by the training tests: a tiny run config and a torchrun launcher for CPU ranks."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import types
import sys
from pathlib import Path

import yaml

from tests.distributed.harness import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]

# Small enough that a step takes milliseconds on one core; big enough to have GQA and two zigzag chunks per rank.
# Budgets small enough that the loss runs in chunks of 8 tokens (320 x 16 bytes a token in float32) and the MLPs
# and norms in tiles of 10 and 27 tokens (64 x 16 and 32 x 12 bytes a token): every training test runs them.
TINY = {
    "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2},
    "data": {"seq_len": 64, "max_bytes": 200_000},
    "train": {"steps": 6, "lr": 3.0e-3, "warmup_steps": 2, "loss_chunk_mib": 0.04, "tile_mib": 0.01},
    "parallel": {"cp": 2, "device": "cpu", "timeout_s": 60},
    "checkpoint": {"every": 3, "keep": 3},
    "log": {"progress": "lines", "plot": False},
}


def write_config(directory: Path, name: str = "tiny.yaml", **sections) -> Path:
    """TINY with ``sections`` merged in (``train={"steps": 4}`` updates keys of train), written as YAML."""
    config = {section: dict(values) for section, values in TINY.items()}
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = directory / name
    path.write_text(yaml.safe_dump(config))
    return path


def torchrun(nproc: int, args, *, env=None, max_restarts: int = 0, timeout_s: float = 120):
    """``python -m torch.distributed.run ... -m ring_flash_attn.train ARGS`` on CPU ranks; the CompletedProcess."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--max-restarts", str(max_restarts), "--master-port", str(free_port()),
               "-m", "ring_flash_attn.train", *map(str, args)]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), **(env or {}))
    return subprocess.run(command, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout_s)


def losses(metrics_path: Path):
    """(step, loss) of every record in a run's metrics.jsonl."""
    return [(r["step"], r["loss"]) for r in map(json.loads, metrics_path.read_text().splitlines())]


def save_tiny_llama(directory: Path, max_position_embeddings: int = 64, seed: int = 7) -> Path:
    """A tiny Llama saved with save_pretrained (config.json + model.safetensors), the shape of TINY's model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def save_tiny_tokenizer(directory: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE tokenizer trained here by `tokenizers` on a little of Python's standard library, saved
    as a transformers tokenizer directory (tokenizer.json + tokenizer_config.json) with an EOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ring_flash_attn.train.config import DataConfig
    from ring_flash_attn.train.data import documents

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [d.decode("utf-8", errors="replace") for d in documents(DataConfig(max_bytes=100_000))]
    tokenizer.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>").save_pretrained(directory)
    return directory


@contextlib.contextmanager
def plain_loss_and_modules():
    """Within: the trainer's one-process reference model (trainer.full_model) computes its loss as cross-entropy
    over the model's own logits, with untiled MLPs and norms: the computation the memory-lean step replaces."""
    import torch.nn.functional as F

    from ring_flash_attn.train import trainer
    from ring_flash_attn.train.loss import LOSS_METHOD

    def plain_loss(model, input_ids, labels, position_ids):
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")

    def attach(model, budget_mib):
        setattr(model, LOSS_METHOD, types.MethodType(plain_loss, model))
        return model

    saved = trainer.apply_chunked_loss, trainer.apply_tiling
    trainer.apply_chunked_loss, trainer.apply_tiling = attach, lambda model, budget_mib: model
    try:
        yield
    finally:
        trainer.apply_chunked_loss, trainer.apply_tiling = saved
