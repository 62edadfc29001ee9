"""Run on every rank of the 2-rank world of test_real_models.py (module level, so spawn can pickle them)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ring_flash_attn.integrations.hf import gather_logits, shard_batch
from ring_flash_attn.train import checkpoint, trainer
from ring_flash_attn.train.config import ConfigError, load_config
from ring_flash_attn.train.metrics import read_metrics

from .fsdp_workers import losses_and_gradients
from .workers import full_state, same_state


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
    meta_path = cache.with_suffix(".json")
    meta = meta_path.read_text()
    dist.barrier()
    if rank == 0:  # as if another tokenizer had written the cache: ids past the model's 320 embedding rows
        meta_path.write_text(json.dumps({**json.loads(meta), "max_token": 400, "tokenizer": "/another/tokenizer"}))
    dist.barrier()
    try:
        trainer.setup(load_config(str(config_path), [("log.dir", str(base / "tokenized_other")),
                                                     *tokenizer_overrides, ("model.extra", "{vocab_size: 320}")]))
        other_tokenizer = None
    except ConfigError as exc:
        other_tokenizer = str(exc)
    dist.barrier()
    if rank == 0:
        meta_path.write_text(meta)
    dist.barrier()
    return {"runs": runs, "corrupt": corrupt, "other_tokenizer": other_tokenizer}


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


def resumed_without_the_pretrained_directory(rank: int, config_path: Path, base: Path, tiny: Path) -> dict:
    """A pretrained run checkpointed at steps 2 and 4; its model directory then moves away, the step-4
    checkpoint is lost, and --resume continues from step 2 with the checkpoint alone; then it is extended to 6
    steps with a doubled batch in another data order (each a one-line note)."""
    model_dir, run_dir = base / "tiny_to_move", base / "moved_model_run"
    if rank == 0:
        shutil.copytree(tiny, model_dir)
    dist.barrier()
    overrides = [("log.dir", str(run_dir)), ("model.pretrained", str(model_dir)), ("data.seq_len", "64"),
                 ("train.steps", "4"), ("checkpoint.every", "2"), ("checkpoint.keep", "3")]
    trainer.train(trainer.setup(load_config(str(config_path), overrides)))
    straight = [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl")]
    dist.barrier()
    if rank == 0:
        model_dir.rename(base / "tiny_moved_away")
        shutil.rmtree(run_dir / "checkpoints" / checkpoint.checkpoint_name(4))
    dist.barrier()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        trainer.train(trainer.setup(load_config(str(config_path), [*overrides, ("checkpoint.resume", "true")])))
    resumed = [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl")]
    extended = io.StringIO()
    with contextlib.redirect_stdout(extended):
        trainer.train(trainer.setup(load_config(str(config_path), [
            *overrides, ("checkpoint.resume", "true"), ("train.steps", "6"), ("train.grad_accum", "2"),
            ("data.seed", "5")])))
    return {"straight": straight, "resumed": resumed, "printed": printed.getvalue(), "extended": extended.getvalue(),
            "extended_steps": [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]}


def step_without_targets(rank: int, config_path: Path, base: Path, document_overrides: list) -> dict:
    """Document masking over a corpus that begins with empty documents: a step whose every position is an end
    of document has no target; it is skipped before it changes anything (it divided by zero after applying NaN
    gradients)."""
    corpus = base / "with_empty_documents.jsonl"
    if rank == 0:
        texts = [""] * 300 + ["".join(chr(97 + (i + j) % 26) for j in range(20)) for i in range(300)]
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    dist.barrier()
    run = trainer.setup(load_config(str(config_path), [("log.dir", str(base / "no_targets")), *document_overrides,
                                                       ("data.path", str(corpus)),
                                                       ("train.micro_batch_size", "1")]))
    targets = [trainer.step_targets(run.dataset, run.plan, step, True) for step in range(40)]
    empty, full = targets.index(0), next(i for i, t in enumerate(targets) if t > 0)
    model = trainer.build_sharded_model(run)
    optimizer = trainer.make_optimizer(model, run.config)
    trainer._step(run, model, optimizer, full)
    before = full_state(model, optimizer)
    skipped = trainer._step(run, model, optimizer, empty)
    now = full_state(model, optimizer)
    after = trainer._step(run, model, optimizer, full + 1 if full + 1 != empty else full + 2)
    run.release()
    return {"skipped": skipped, "after": after, "unchanged": same_state(before, now) if rank == 0 else None}


def shipped_pretrained_documents_config(rank: int, base: Path) -> dict:
    """configs/cpu_pretrained_documents.yaml as shipped, by its bare name, with only the local model and tokenizer
    directories given (a 2-layer Llama of 256 positions and a byte-level BPE tokenizer saved by the test), two
    steps, and the corpus of tokenized_runs (its token cache, already built)."""
    overrides = [("model.pretrained", str(base / "tiny_llama_256")), ("data.tokenizer", str(base / "tokenizer")),
                 ("data.cache_dir", str(base / "token_cache")), ("data.max_bytes", "60000"),
                 ("log.dir", str(base / "shipped_example")), ("train.steps", "2")]
    records = trainer.train(trainer.setup(load_config("cpu_pretrained_documents.yaml", overrides)))
    return {"losses": [r["loss"] for r in records]}


def all_scenarios(rank: int, world_size: int, config_path: Path, base: Path, pretrained_overrides: list,
                  tokenizer_overrides: list, document_overrides: list) -> dict:
    with warnings.catch_warnings(record=True) as caught:  # what the document-mask path prints on every rank
        warnings.simplefilter("always", FutureWarning)
        documents = losses_and_gradients(config_path, base / "documents", *document_overrides)
    return {
        "documents": documents,
        "document_warnings": [str(w.message) for w in caught if issubclass(w.category, FutureWarning)],
        "no_targets": step_without_targets(rank, config_path, base, document_overrides),
        "moved_model": resumed_without_the_pretrained_directory(rank, config_path, base, base / "tiny_llama"),
        "pretrained_weights": initial_weights(config_path, base / "pretrained_weights", *pretrained_overrides),
        "pretrained": losses_and_gradients(config_path, base / "pretrained", *pretrained_overrides),
        "tokenized": tokenized_runs(rank, config_path, base, tokenizer_overrides),
        "shipped_example": shipped_pretrained_documents_config(rank, base),  # after: it reuses that token cache
        "export": trained_for_export(rank, config_path, base, tokenizer_overrides),
    }
