"""The training loop: FSDP-sharded over data x context ranks, checkpointed, resumable, and its ``--check`` twin.

Order of work in a run, chosen so that nothing can hang on bad input: read
and check the config, the model (a pretrained directory's headers, or the config
of the checkpoint a resumed run continues) and the data on every rank (no
communication), then join the process group, build the mesh, let rank 0 tokenize
a corpus that has no token cache yet and then lock the run's directories (each
verdict reaches every rank), build and shard the model, restore a checkpoint, train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..comm import choose_backend, default_device_type, detect_launch, init_distributed
from . import checkpoint, memory_plan, resume, rundir, tokens
from ..integrations.hf import (register_ring_attention, shard_batch, substitute_hf_flash_attn,
                               update_ring_flash_attn_params)
from .config import DEFAULT_CHECK_RTOL, ConfigError, RunConfig, validate_for_world
from .data import Batch, BatchPlan, PackedDataset, document_cu_seqlens
from .faults import FaultInjector
from .flops import flops_per_token, peak_tflops
from .loss import apply_chunked_loss
from .metrics import (METRICS_FILE, PLOT_FILE, RANK_SUMMARY, MetricsLog, Progress, StepTimer, peak_memory_bytes,
                      plot_loss, read_metrics)
from .mesh import Mesh, build_mesh
from .model import (build_empty_model, build_model, check_model, materialize_for_checkpoint, materialize_from_rank0,
                    model_config, token_loss_sum)
from .parallel import parallelize
from .tiling import apply_tiling
from .preemption import StopRequest, TrainingInterrupted
from .profiling import StepProfiler
from ..ulysses import usp_process_groups

# The attention full-sequence runs use in --check: PyTorch's fused attention over the whole sequence.
FULL_ATTENTION = "sdpa"


class StepFailed(RuntimeError):
    """A step could not finish (a peer died or stopped answering); the message names the step."""


class CheckFailed(RuntimeError):
    """--check found context-parallel losses that differ from full attention beyond the tolerance."""


class NonFiniteLoss(RuntimeError):
    """A step's loss or gradient norm is NaN or infinite (train.nonfinite: error): raised on every rank before
    the optimizer step, so the weights, the optimizer state and every checkpoint stay as they were."""


# train.nonfinite skip: this many skipped steps in a row stop the run (a model whose every gradient is NaN never
# recovers; skipping on would train nothing and report success).
MAX_NONFINITE_IN_A_ROW = 10
# Why an optimizer step was not taken (StepResult.skipped).
SKIPPED_NONFINITE = "non-finite loss or gradient norm"
SKIPPED_NO_TARGETS = "no target tokens"


class StepResult(NamedTuple):
    loss: float                    # the global mean loss (NaN for a step without targets)
    grad_norm: float
    skipped: Optional[str] = None  # why the optimizer step was not taken (weights and optimizer state unchanged)


@dataclass
class Run:
    config: RunConfig
    rank: int
    world_size: int
    device: torch.device
    mesh: Mesh
    dataset: PackedDataset
    plan: BatchPlan
    attn_implementation: str
    memory: memory_plan.Plan            # this rank's memory at the run's length; ``config`` holds its choices
    lock: Optional[rundir.RunDirectoryLock] = None  # rank 0's locks on log.dir (and checkpoint.dir), for the run
    resume_from: Optional[Path] = None  # the checkpoint whose model config builds the model (resume.py)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    @property
    def tokens_per_step(self) -> int:
        return self.plan.samples_per_step * self.config.data.seq_len

    def say(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)


def setup(config: RunConfig) -> Run:
    """Check everything that can be checked alone, then join the process group and build the mesh."""
    launch = detect_launch()
    dp_size = validate_for_world(config, launch.world_size)
    resume_from = resume.resume_point(config)
    if resume_from is not None:
        resume.check_same_model(config, resume_from)
    empty_model = check_model(config, FULL_ATTENTION, resume_from)
    device_type = default_device_type() if config.parallel.device == "auto" else config.parallel.device
    memory_plan.check_device_choices(config, device_type)
    _, device = init_distributed(device_type, config.parallel.dist_backend, config.parallel.timeout_s)
    memory = plan_memory(config, empty_model, launch.world_size, device)
    config = memory_plan.resolve(config, memory)
    # Read on every rank (each its own file system), then every rank raises whichever rank's error: a rank
    # that failed alone would exit, and the launcher would kill the others before they said why.
    dataset = _shared_errors(lambda: None if config.data.tokenizer else PackedDataset.from_config(config.data))
    mesh = build_mesh(device_type, dp_size, config.parallel.cp, config.parallel.timeout_s,
                      config.parallel.fsdp_replicate)
    if dataset is None:  # tokenized once, by rank 0, into the shared token cache (tokens.py)
        tokens.prepare(config.data, launch.rank)
        stream, meta, fingerprint = tokens.load(config.data)
        tokens.check_vocabulary(config.data, meta, model_config(config, resume_from).vocab_size)
        dataset = PackedDataset(stream, config.data.seq_len, config.data.seed, fingerprint, eos=meta["eos"])
    _check_same_data(dataset)
    if config.parallel.ulysses > 1:  # the ulysses x ring mesh over the cp ranks, with the run's collective timeout
        usp_process_groups(config.parallel.ulysses, mesh.cp_group, timeout=timedelta(seconds=config.parallel.timeout_s))
    attn_implementation = attention_implementation(config, mesh)
    if config.data.document_mask:
        # Documents of any length, crossing the ranks' pieces: the all-gather (llama3) exchange over contiguous
        # pieces serves them; the zigzag/stripe layouts would need every document's length divisible by 2 x cp.
        kv_heads = model_config(config, resume_from).num_key_value_heads
        substitute_hf_flash_attn(mesh.cp_group, heads_k_stride=kv_heads)
    plan = BatchPlan(dp_size, config.train.micro_batch_size, config.train.grad_accum)
    # Last, so that nothing after it can fail and leave it held: rank 0 locks log.dir and checkpoint.dir (another
    # run on either fails here, naming the holder); its verdict reaches every rank.
    lock = _shared_errors(lambda: rundir.claim(Path(config.log.dir), config.checkpoint_dir())
                          if launch.rank == 0 else None)
    return Run(config, launch.rank, launch.world_size, device, mesh, dataset, plan, attn_implementation, memory,
               lock, resume_from)


def attention_implementation(config: RunConfig, mesh: Mesh) -> str:
    """The model's attention: ring attention over the cp group; at cp = 1, unless a kernel backend is forced or
    documents are masked (transformers' SDPA path would attend across packed documents), transformers' own SDPA
    attention, which needs no ring machinery and compiles into a layer's graph."""
    if mesh.cp_size == 1 and not config.data.document_mask and config.parallel.attn_backend is None:
        return FULL_ATTENTION
    return register_ring_attention(mesh.cp_group, config.parallel.variant, config.parallel.attn_backend,
                                   ulysses_size=config.parallel.ulysses)


def plan_memory(config: RunConfig, empty_model: nn.Module, world_size: int,
                device: torch.device) -> memory_plan.Plan:
    """The memory plan of this rank, the same on every rank: it assumes the smallest device memory of any rank
    (or ``parallel.device_memory_gib``), so every rank makes the same automatic choices."""
    local = memory_plan.local_ranks(world_size)
    # The host's memory matters for what is offloaded to it: each rank's share of its host's.
    smallest = torch.tensor([memory_plan.device_memory(device, local), memory_plan.host_memory(local)],
                            dtype=torch.int64, device=device)
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    device_bytes, host_bytes = smallest.tolist()
    if config.parallel.device_memory_gib is not None:
        device_bytes = int(config.parallel.device_memory_gib * memory_plan.GIB)
    accelerator = device.type != "cpu"
    settings = memory_plan.Settings.of(config, world_size, accelerator, device_bytes,
                                       host_bytes if accelerator else None)
    shape = memory_plan.Shape.of_model(empty_model)
    plan = memory_plan.plan_step(shape, settings, device_bytes)
    longest = memory_plan.longest_fitting(shape, settings, device_bytes, multiple=2 * config.parallel.cp)
    plan.notes.append(f"longest data.seq_len predicted to fit: {longest:,} tokens (at micro_batch_size "
                      f"{config.train.micro_batch_size}; `ring-attn capacity` measures it)")
    return plan


def _shared_errors(read):
    """``read()`` on every rank; if it raised on any rank, every rank raises (its own error, or a ConfigError
    naming the first rank that failed and why)."""
    error = None
    try:
        result = read()
    except Exception as exc:  # shared below, then raised on every rank
        error, result = exc, None
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else str(error))
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
    if failed:
        rank, message = failed[0]
        raise ConfigError(f"{message} (on rank {rank})")
    return result


def _check_same_data(dataset: PackedDataset) -> None:
    """Every rank must have packed the same corpus (e.g. the same Python stdlib on every node)."""
    fingerprints = [None] * dist.get_world_size()
    dist.all_gather_object(fingerprints, dataset.fingerprint)
    if len(set(fingerprints)) > 1:
        raise ConfigError(f"data: ranks packed different corpora (fingerprints by rank: {fingerprints}); give every "
                         f"node the same files (data.path) or the same Python installation (data.source stdlib)")


def learning_rate(config: RunConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``lr * min_lr_ratio``; a pure function of the step (nothing to save)."""
    train = config.train
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return train.lr * (train.min_lr_ratio + (1 - train.min_lr_ratio) * cosine)


def make_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    # Weight decay on matrices only: decaying norm gains and biases pulls them towards zero for no benefit.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.train.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused: one kernel for every parameter's update instead of a few per group of tensors (what a plain loop uses)
    return torch.optim.AdamW(groups, lr=config.train.lr, betas=(config.train.beta1, config.train.beta2), fused=True)


def _reference_autocast(config: RunConfig, device: torch.device, sharded: bool):
    """bfloat16 compute for the unsharded --check reference (FSDP's MixedPrecisionPolicy does it when sharded)."""
    if config.train.precision == "bf16" and not sharded:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: List[Batch],
                   targets_per_step: int, lr: float, config: RunConfig, device: torch.device,
                   distributed: bool, cp_group=None) -> StepResult:
    """One optimizer step over ``micro_batches`` (this rank's tokens): (global mean loss, grad norm, skipped).

    ``targets_per_step`` counts the targets of the whole step on every rank, so each rank's loss is its share of
    the global mean and FSDP's SUM reduce-scatter of gradients (``distributed``: the model is sharded) yields
    the global mean's gradient (see fsdp.py). The step is not taken (``skipped`` says why; weights and
    optimizer state unchanged) when it has no targets, which every rank knows from the data, or when the loss
    or the gradient norm is not finite, which every rank sees alike (both are reduced over every rank).
    """
    optimizer.zero_grad(set_to_none=True)
    if targets_per_step == 0:  # document masking over nothing but end-of-document tokens: nothing to learn
        return StepResult(float("nan"), 0.0, SKIPPED_NO_TARGETS)
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    for batch in micro_batches:
        if batch.cu_seqlens is not None:  # document masking: the all-gather exchange needs the row's documents
            update_ring_flash_attn_params(batch.cu_seqlens.to(device), cp_group)
        with _reference_autocast(config, device, distributed):
            token_losses = token_loss_sum(model, batch.input_ids.to(device), batch.labels.to(device),
                                          batch.position_ids.to(device))
        (token_losses / targets_per_step).backward()
        loss_sum += token_losses.detach()
    if distributed:
        dist.all_reduce(loss_sum)
    max_norm = config.train.grad_clip if config.train.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor when the parameters are sharded
        grad_norm = grad_norm.full_tensor()
    # The step's one transfer to the host, both numbers at once, before the optimizer could apply a NaN.
    loss_total, norm = torch.stack([loss_sum, grad_norm.to(loss_sum)]).tolist()
    loss = loss_total / targets_per_step
    if not (math.isfinite(loss) and math.isfinite(norm)):
        return StepResult(loss, norm, SKIPPED_NONFINITE)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return StepResult(loss, norm)


def local_micro_batches(run: Run, step: int) -> List[Batch]:
    """This rank's slices of its replica's sequences for optimizer step ``step`` (0-based)."""
    batches = []
    for micro_step in range(run.plan.grad_accum):
        full = run.dataset.batch(run.plan.indices(step, micro_step, run.mesh.dp_rank), run.config.data.document_mask)
        if run.config.data.document_mask:
            batches.append(_contiguous_piece(full, run.mesh.cp_rank, run.mesh.cp_size))
            continue
        local = shard_batch(full.input_ids, full.labels, full.position_ids, variant=run.config.parallel.variant,
                            group=run.mesh.cp_group)
        batches.append(Batch(local["input_ids"], local["labels"], local["position_ids"]))
    return batches


def _contiguous_piece(full: Batch, cp_rank: int, cp_size: int) -> Batch:
    """Document masking: the micro-batch's sequences as one packed row, cut into ``cp_size`` contiguous pieces
    (the all-gather exchange's layout); this rank's piece and the row's document boundaries."""
    row = [t.reshape(1, -1) for t in (full.input_ids, full.labels, full.position_ids)]
    piece = row[0].shape[1] // cp_size
    local = [t[:, cp_rank * piece:(cp_rank + 1) * piece] for t in row]
    return Batch(*local, cu_seqlens=document_cu_seqlens(row[2]))


def step_targets(dataset: PackedDataset, plan: BatchPlan, step: int, document_mask: bool) -> int:
    """The targets of optimizer step ``step`` over every replica: computed by every rank from the data alone
    (no communication); every token when every position is a target."""
    if not document_mask:
        return plan.samples_per_step * dataset.seq_len
    return sum(dataset.batch(plan.global_indices(step, micro), True).num_targets for micro in range(plan.grad_accum))


def full_model(config: RunConfig, attn_implementation: str) -> nn.Module:
    """The whole model with its initial weights, in host memory (rank 0 only, and the --check reference), with
    the run's chunked loss and tiling (the same numbers as the sharded model's, in less memory)."""
    model = build_model(config, attn_implementation)
    apply_tiling(model, config.train.tile_mib)
    # a run's config has its memory choices resolved; a bare one (the --check reference) takes the largest chunk
    return apply_chunked_loss(model, config.train.loss_chunk_mib or memory_plan.LOSS_CHUNK_MAX_MIB)


def build_sharded_model(run: Run) -> nn.Module:
    """The run's model, parallelised (parallel.py) and sharded over every rank, with rank 0's initial weights
    (resuming: with room for the checkpoint's, which train() loads)."""
    config = run.config
    model = build_empty_model(config, run.attn_implementation, run.resume_from)
    parallelize(model, config, run.mesh, run.device)
    if run.resume_from is not None:
        materialize_for_checkpoint(model, config, run.attn_implementation, run.resume_from, run.device)
        model.train()
        return model
    full, problem = None, None
    if run.rank == 0:
        try:
            full = full_model(config, run.attn_implementation)
        except Exception as exc:  # e.g. unreadable weights the header check could not see: fail every rank alike
            problem = f"model: rank 0 could not build the model: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    verdict = [problem]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise ConfigError(verdict[0])
    materialize_from_rank0(model, full, run.device)
    model.train()
    return model


def _collective(run: Run, step: int, fn, *args):
    """``fn(*args)`` (which communicates) with communication failures turned into an error naming the step."""
    try:
        return fn(*args)
    except RuntimeError as exc:  # what gloo/nccl/xccl raise when a peer died or a collective outlived the timeout
        ring = dist.get_process_group_ranks(run.mesh.cp_group)
        raise StepFailed(f"step {step + 1} failed on rank {run.rank}: {exc} (this rank's context-parallel ring: "
                         f"ranks {ring}; a peer that stops answering fails the run after parallel.timeout_s = "
                         f"{run.config.parallel.timeout_s:g} s)") from exc


def _step(run: Run, model, optimizer, step: int) -> StepResult:
    """Optimizer step ``step`` (0-based); NonFiniteLoss on every rank if its loss is not finite and
    train.nonfinite is "error"."""
    targets = step_targets(run.dataset, run.plan, step, run.config.data.document_mask)
    result = _collective(run, step, optimizer_step, model, optimizer, local_micro_batches(run, step), targets,
                         learning_rate(run.config, step), run.config, run.device, True, run.mesh.cp_group)
    if result.skipped == SKIPPED_NONFINITE and run.config.train.nonfinite == "error":
        raise NonFiniteLoss(
            f"step {step + 1}: the loss is {result.loss:g} and the gradient norm {result.grad_norm:g} (not finite): "
            f"stopped before the optimizer step, so the weights and checkpoints are as after step {step}; lower "
            f"train.lr, look at the data of this step, or set train.nonfinite: skip to drop such steps")
    return result


def train(run: Run) -> List[dict]:
    """Train for ``train.steps`` steps (continuing from a checkpoint if asked); returns rank 0's step records.
    The run's directory locks are released at the end, however it ends."""
    try:
        return _train(run)
    finally:
        run.release()


def _train(run: Run) -> List[dict]:
    config = run.config
    root = config.checkpoint_dir()
    model = build_sharded_model(run)
    optimizer = make_optimizer(model, config)
    expected = checkpoint.TrainState(0, 0, run.dataset.fingerprint, run.mesh.dp_size, run.mesh.cp_size)
    start_step = 0
    found = checkpoint.latest(root)
    if found is not None and not config.checkpoint.resume:
        raise checkpoint.CheckpointError(f"checkpoint.dir {root} already holds {found.name}: pass --resume to "
                                         f"continue from it, or choose another checkpoint.dir / log.dir")
    if found is not None:
        state = checkpoint.load(found, model, optimizer, run.device, config.checkpoint.verify, expected)
        start_step = state.step
        run.plan = dataclasses.replace(run.plan, first_step=state.step, first_sample=state.samples_consumed)
        resharded = (state.dp_size, state.cp_size) != (run.mesh.dp_size, run.mesh.cp_size)
        run.say(f"resumed from {found} (step {start_step})" + (
            f", written at dp={state.dp_size} x cp={state.cp_size}, resharded to dp={run.mesh.dp_size} x "
            f"cp={run.mesh.cp_size}" if resharded else ""))
    elif config.checkpoint.resume:
        run.say(f"--resume: no checkpoint in {root} yet, starting from step 0")
    if start_step >= config.train.steps:
        run.say(f"nothing to train: the run is complete ({found.name} in {root} is at step {start_step}, "
                f"train.steps = {config.train.steps}); raise --train.steps to train further")
        return []
    if found is not None:
        for note in resume.changes(found, state, config, run.plan.samples_per_step, run.mesh.dp_size, learning_rate):
            run.say(note)

    run.say(_describe(run, model))
    run.say("\n".join(run.memory.describe()))
    log_dir = Path(config.log.dir)
    metrics = _shared_errors(lambda: _open_metrics(log_dir / METRICS_FILE, start_step, config.checkpoint.resume)
                             if run.rank == 0 else None)
    progress = Progress(config.log.progress if run.rank == 0 else "off", config.train.steps, start_step,
                        config.log.every)
    faults = FaultInjector(run.rank, config.data.seq_len)
    timer = StepTimer(run.device)
    model_flops = flops_per_token(model, config.data.seq_len)
    peak = peak_tflops(run.device, config.train.precision, config.log.peak_tflops)
    records, last_saved, skipped, in_a_row = [], start_step if found is not None else None, 0, 0
    final_step, stopped_by, log_failed = config.train.steps, None, False
    started = time.perf_counter()
    profiler = StepProfiler(config.log.profile_steps, config.log.profile_after, run.device, run.rank, log_dir)
    try:
        with StopRequest(grace_s=config.parallel.timeout_s) as stop, profiler:
            for step in range(start_step, config.train.steps):
                faults.at_step(step + 1)
                timer.start()
                result = _step(run, model, optimizer, step)
                seconds = timer.stop()
                skipped += result.skipped is not None
                in_a_row = in_a_row + 1 if result.skipped == SKIPPED_NONFINITE else 0
                if in_a_row == MAX_NONFINITE_IN_A_ROW:
                    raise NonFiniteLoss(f"steps {step + 2 - in_a_row}-{step + 1}: {in_a_row} steps in a row had a "
                                        f"non-finite loss or gradient norm and were skipped (train.nonfinite: skip): "
                                        f"the model does not recover; resume from an earlier checkpoint with a lower "
                                        f"train.lr")
                if result.skipped is not None:
                    run.say(f"step {step + 1}: skipped ({result.skipped}; loss {result.loss:g}): weights and "
                            f"optimizer state unchanged; {skipped} step(s) skipped so far")
                tflops_per_device = model_flops * run.tokens_per_step / seconds / run.world_size / 1e12
                record = {"step": step + 1, "loss": _finite_or_none(result.loss),
                          "grad_norm": _finite_or_none(result.grad_norm), "lr": learning_rate(config, step),
                          "tokens": run.tokens_per_step, "tokens_per_s": run.tokens_per_step / seconds,
                          "tokens_per_s_per_device": run.tokens_per_step / seconds / run.world_size,
                          "tflops_per_device": tflops_per_device,
                          "mfu": tflops_per_device / peak if peak else None,
                          "step_time_s": seconds, "peak_memory_bytes": peak_memory_bytes(run.device)}
                if result.skipped is not None:
                    record.update(skipped=result.skipped, skipped_steps=skipped)
                records.append(record)
                if metrics is not None:
                    metrics.write(record)
                progress.update(record)
                every = config.checkpoint.every if config.checkpoint.save else 0
                if every and (step + 1) % every == 0:
                    checkpoint.save(root, _train_state(run, step + 1), model, optimizer, run.device,
                                    config.checkpoint.keep, config.to_dict())
                    last_saved = step + 1
                profiler.step_done()
                stopped_by, log_failed = _collective(run, step, stop.agreed_stop, run.device,
                                                     metrics is not None and metrics.failure is not None)
                if stopped_by is not None or log_failed:
                    final_step = step + 1
                    break
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / RANK_SUMMARY.format(rank=run.rank)).write_text(json.dumps(
        {"rank": run.rank, "peak_memory_bytes": peak_memory_bytes(run.device), "steps": len(records)}))
    if last_saved != final_step and config.checkpoint.save:
        checkpoint.save(root, _train_state(run, final_step), model, optimizer, run.device, config.checkpoint.keep,
                        config.to_dict())
    if log_failed:  # rank 0's words, on every rank
        failure = [metrics.failure if metrics is not None else None]
        dist.broadcast_object_list(failure, src=0)
        raise ConfigError(f"log.dir: {failure[0]} after step {final_step}; every rank stopped there and saved "
                          f"checkpoint {checkpoint.checkpoint_name(final_step)} in {root}: free space (or repair the "
                          f"file) and continue with --resume")
    if stopped_by is not None:
        raise TrainingInterrupted(f"stopped by {signal.Signals(stopped_by).name} after step {final_step} of "
                                  f"{config.train.steps}; checkpoint {checkpoint.checkpoint_name(final_step)} "
                                  f"saved in {root}: continue with --resume", stopped_by)
    run.say(f"done: steps {start_step + 1}-{config.train.steps} in {time.perf_counter() - started:.1f} s"
            + (f" ({skipped} skipped: see 'skipped' in the log)" if skipped else "")
            + f"; log {log_dir / METRICS_FILE}; checkpoints in {root}")
    if run.rank == 0 and config.log.plot and records:
        png = plot_loss(log_dir / METRICS_FILE, log_dir / PLOT_FILE)
        if png is not None:
            print(f"loss plot: {png}", flush=True)
    return records


def _open_metrics(path: Path, start_step: int, resuming: bool) -> MetricsLog:
    """Rank 0's metrics log. A new run (no --resume) in a log.dir that holds another run's log would cut it to
    nothing (as a resume cuts the steps after its checkpoint): refused. (A run with --resume and no checkpoint
    yet, a restart before the first save, drops its earlier attempt's records: they are recomputed.)"""
    try:
        earlier = read_metrics(path) if not resuming else []
        if earlier:
            raise ConfigError(f"log.dir: {path} holds the log of another run (steps {earlier[0]['step']}-"
                              f"{earlier[-1]['step']}) that a new run would overwrite: pass --resume to continue "
                              f"that run, or choose another log.dir")
        return MetricsLog(path, start_step)
    except OSError as exc:
        raise ConfigError(f"log.dir: cannot write {path}: {type(exc).__name__}: {exc.strerror or exc}") from None


def _finite_or_none(value: float) -> Optional[float]:
    """JSON has no NaN or infinity (json.dumps would write a token other readers reject): null instead."""
    return value if math.isfinite(value) else None


def _train_state(run: Run, steps_done: int) -> checkpoint.TrainState:
    return checkpoint.TrainState(steps_done, run.plan.samples_before(steps_done), run.dataset.fingerprint,
                                 run.mesh.dp_size, run.mesh.cp_size)


def _describe(run: Run, model: nn.Module) -> str:
    config = run.config
    params = sum(p.numel() for p in model.parameters())
    backend = choose_backend(run.device.type, config.parallel.dist_backend)
    shard_mib = sum(p.to_local().numel() * p.element_size() for p in model.parameters()) / 2**20
    source = f"pretrained {config.model.pretrained}" if config.model.pretrained else config.model.family
    layout = "document mask, all-gather K/V" if config.data.document_mask else config.parallel.variant
    return (f"model {source}: {params / 1e6:.2f} M parameters, {shard_mib:.1f} MiB of them on each "
            f"rank (FSDP) | mesh dp={run.mesh.dp_size} x "
            f"cp={run.mesh.cp_size} ({layout}) on {run.world_size} x {run.device.type} ({backend}) | "
            f"{run.plan.samples_per_step} sequences x {config.data.seq_len} tokens = {run.tokens_per_step} tokens "
            f"per step | data: {run.dataset.num_sequences} sequences ({config.data.source})")


def reference_steps(config: RunConfig, dataset: PackedDataset, plan: BatchPlan, steps: int,
                    device: torch.device) -> Iterator[Tuple[float, nn.Module]]:
    """The run's first ``steps`` optimizer steps on this one process, full attention, the whole batch of every
    replica at once: yields (loss, model) after each step (the model's gradients are that step's)."""
    model = full_model(config, FULL_ATTENTION).to(device).train()
    optimizer = make_optimizer(model, config)
    document_mask = config.data.document_mask
    for step in range(steps):
        batches = [dataset.batch(plan.global_indices(step, micro), document_mask) for micro in range(plan.grad_accum)]
        result = optimizer_step(model, optimizer, batches, step_targets(dataset, plan, step, document_mask),
                                learning_rate(config, step), config, device, distributed=False)
        yield result.loss, model


def check(run: Run) -> List[Tuple[float, float]]:
    """Train ``check.steps`` steps with context parallelism, then (rank 0) with full attention on one rank
    from the same weights and data; raise CheckFailed on every rank if a loss differs beyond the tolerance.

    Returns the (context-parallel, full-attention) loss pairs (on every rank).
    """
    try:
        return _check(run)
    finally:
        run.release()


def _check(run: Run) -> List[Tuple[float, float]]:
    config = run.config
    if run.resume_from is not None:
        raise ConfigError("--check compares training from the initial weights: drop --resume (checkpoint.resume)")
    steps = config.check.steps
    rtol = config.check.rtol if config.check.rtol is not None else DEFAULT_CHECK_RTOL[config.train.precision]
    model = build_sharded_model(run)
    optimizer = make_optimizer(model, config)
    parallel_losses = [_step(run, model, optimizer, step).loss for step in range(steps)]

    verdict: list = [None, None]
    if run.rank == 0:
        print(f"--check: {steps} steps with full attention on rank 0 (the other ranks wait, up to "
              f"parallel.timeout_s = {config.parallel.timeout_s:g} s)", flush=True)
        full_losses = [loss for loss, _ in reference_steps(config, run.dataset, run.plan, steps, run.device)]
        pairs = list(zip(parallel_losses, full_losses))
        worst = max(_relative_difference(p, f) for p, f in pairs)
        for step, (p, f) in enumerate(pairs, 1):
            print(f"  step {step}: context-parallel {p:.6f}  full attention {f:.6f}  rel diff "
                  f"{_relative_difference(p, f):.2e}", flush=True)
        passed = worst <= rtol
        print(f"--check {'passed' if passed else 'FAILED'}: worst relative loss difference {worst:.2e} "
              f"(tolerance {rtol:g}, {config.train.precision})", flush=True)
        verdict = [pairs, None if passed else f"--check failed: context-parallel losses differ from full attention "
                                              f"by up to {worst:.2e} relative, tolerance {rtol:g}"]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[1] is not None:
        raise CheckFailed(verdict[1])
    return verdict[0]


def _relative_difference(parallel: float, full: float) -> float:
    """|parallel - full| / |full|; 0 for a step both skipped for want of targets (both NaN)."""
    if math.isnan(parallel) and math.isnan(full):
        return 0.0
    return abs(parallel - full) / abs(full)


def shutdown() -> None:
    if dist.is_initialized():
        # On gloo a rank tearing down subgroups (the Ulysses mesh) while a peer still uses them aborts the peer.
        dist.barrier()
        dist.destroy_process_group()


def run_from_config(config: RunConfig, check_mode: bool) -> Optional[list]:
    run = setup(config)
    result = check(run) if check_mode else train(run)
    shutdown()
    return result
