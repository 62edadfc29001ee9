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

from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from ring_flash_attn.train import checkpoint, trainer
from ring_flash_attn.train.config import ConfigError, load_config
from ring_flash_attn.train.metrics import read_metrics


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


def poison_forwards(model, on_rank: int, calls) -> None:
    """The embeddings of forward calls ``calls`` (1-based) of ``model`` become NaN on rank ``on_rank`` (as a bad
    batch or an overflow on one rank would make them): every rank's loss is then NaN, through the reduction."""
    count = [0]

    def hook(module, inputs, output):
        count[0] += 1
        return output * float("nan") if count[0] in calls and dist.get_rank() == on_rank else output

    model.get_input_embeddings().register_forward_hook(hook)


def full_state(model, optimizer) -> list:
    """Every tensor of the model's and the optimizer's state, whole, in a fixed order (rank 0; [] elsewhere)."""
    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                         cpu_offload=True))

    def tensors(value, path=""):
        if isinstance(value, dict):
            for key in sorted(value, key=str):
                yield from tensors(value[key], f"{path}/{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                yield from tensors(item, f"{path}/{i}")
        elif isinstance(value, torch.Tensor):
            yield path, value.clone()

    return list(tensors({"model": model_state, "optim": optim_state}))


def same_state(a: list, b: list) -> bool:
    return [p for p, _ in a] == [p for p, _ in b] and all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b))


def nonfinite_losses(rank: int, config_path: Path, base: Path) -> dict:
    """A NaN loss: under train.nonfinite error (the default) every rank stops before the optimizer step and no
    checkpoint is saved or pruned; under skip the step changes nothing and is logged; a model holding a NaN
    is never saved."""
    real_build = trainer.build_sharded_model

    def build_poisoned_at_step_5(run):
        model = real_build(run)
        poison_forwards(model, 1, {5})
        return model

    with mock.patch.object(trainer, "build_sharded_model", build_poisoned_at_step_5):
        stopped = _error_of(lambda: trainer.train(trainer.setup(_config(
            config_path, base / "nan_error", ("checkpoint.keep", "1")))), trainer.NonFiniteLoss)
    error_run = {"error": stopped, "left": [p.name for _, p in checkpoint.list_checkpoints(
        base / "nan_error" / "checkpoints")], "logged": [r["step"] for r in read_metrics(
        base / "nan_error" / "metrics.jsonl")]}

    # train.nonfinite skip, step by step: the skipped step leaves every weight and optimizer moment as it was.
    run = trainer.setup(_config(config_path, base / "nan_skip", ("train.nonfinite", "skip"),
                                ("checkpoint.keep", "1")))
    model = trainer.build_sharded_model(run)
    optimizer = trainer.make_optimizer(model, run.config)
    poison_forwards(model, 0, {2})
    first = trainer._step(run, model, optimizer, 0)
    before = full_state(model, optimizer)
    poisoned = trainer._step(run, model, optimizer, 1)
    now = full_state(model, optimizer)  # a collective: on every rank
    unchanged = same_state(before, now) if rank == 0 else None
    after = trainer._step(run, model, optimizer, 2)
    root = run.config.checkpoint_dir()
    checkpoint.save(root, trainer._train_state(run, 3), model, optimizer, run.device, 1, run.config.to_dict())
    if rank == 1:  # a NaN in rank 1's shard of one weight
        with torch.no_grad():
            next(model.parameters()).to_local().view(-1)[0] = float("nan")
    refused = _error_of(lambda: checkpoint.save(root, trainer._train_state(run, 4), model, optimizer, run.device, 1,
                                                run.config.to_dict()), checkpoint.CheckpointError)
    gloo_reset = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
    with mock.patch.object(checkpoint, "_raise_if_any_rank_failed", side_effect=gloo_reset):  # a peer died
        peer_lost = _error_of(lambda: checkpoint.save(root, trainer._train_state(run, 5), model, optimizer,
                                                      run.device, 1, run.config.to_dict()), checkpoint.CheckpointError)
    run.release()
    skip_steps = {"first": first, "poisoned": poisoned, "after": after, "unchanged": unchanged,
                  "refused": refused, "peer_lost": peer_lost,
                  "left": [p.name for _, p in checkpoint.list_checkpoints(root)]}

    # The same in a whole run: the skipped step is logged as such and the run finishes.
    with mock.patch.object(trainer, "build_sharded_model", lambda r: _poisoned(real_build(r), {2})):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            records = trainer.train(trainer.setup(_config(config_path, base / "nan_skip_run", (
                "train.nonfinite", "skip"), ("train.steps", "3"), ("checkpoint.every", "0"))))
    with mock.patch.object(trainer, "build_sharded_model", lambda r: _poisoned(real_build(r), set(range(2, 20)))), \
            mock.patch.object(trainer, "MAX_NONFINITE_IN_A_ROW", 3):  # 3, not 10: fewer steps to run
        never_recovers = _error_of(lambda: trainer.train(trainer.setup(_config(config_path, base / "nan_skip_all", (
            "train.nonfinite", "skip"), ("train.steps", "6"), ("checkpoint.every", "0")))), trainer.NonFiniteLoss)
    return {"error_run": error_run, "skip_steps": skip_steps, "never_recovers": never_recovers,
            "skip_run": {"records": records, "printed": printed.getvalue(),
                         "logged": read_metrics(base / "nan_skip_run" / "metrics.jsonl")}}


def _poisoned(model, calls):
    poison_forwards(model, 1, calls)
    return model


def run_directory_claims(rank: int, config_path: Path, base: Path) -> dict:
    """A log.dir another run holds (the test process locked it) and one that cannot be created: the same
    error on every rank, before any training."""
    locked = _error_of(lambda: trainer.setup(_config(config_path, base / "locked")), ConfigError)
    _on_rank0_then_sync(rank, lambda: (base / "a_file").write_text("not a directory"))
    unwritable = _error_of(lambda: trainer.setup(_config(config_path, base / "a_file" / "run")), ConfigError)
    return {"locked": locked, "unwritable": unwritable,
            "locked_dir_after": sorted(p.name for p in (base / "locked").iterdir())}


def damaged_manifest(rank: int, config_path: Path, base: Path) -> dict:
    """Resuming from a checkpoint whose manifest is valid JSON of the wrong shape."""
    run_dir = base / "bad_manifest"

    def copy_and_damage():
        shutil.copytree(base / "straight" / "checkpoints", run_dir / "checkpoints")
        (run_dir / "checkpoints" / checkpoint.checkpoint_name(6) / checkpoint.MANIFEST).write_text('{"files": []}')

    _on_rank0_then_sync(rank, copy_and_damage)
    return {"error": _error_of(lambda: trainer.train(trainer.setup(_config(
        config_path, run_dir, ("checkpoint.resume", "true"), ("train.steps", "8")))), checkpoint.CheckpointError)}


def metrics_disk_full(rank: int, config_path: Path, base: Path) -> dict:
    """Rank 0 cannot write the metrics of step 4 (a full disk): every rank stops after that step with a
    checkpoint and the same error (rank 0 used to die alone, the others saw "Connection closed by peer")."""
    from ring_flash_attn.train.metrics import MetricsLog

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def write(self, text):
            if '"step": 4,' in text:
                raise OSError(28, "No space left on device")
            return self.handle.write(text)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    real_init = MetricsLog.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self._handle = FullDisk(self._handle)

    with mock.patch.object(MetricsLog, "__init__", init):
        error = _error_of(lambda: trainer.train(trainer.setup(_config(config_path, base / "metrics_full"))),
                          ConfigError)
    return {"error": error, "left": [p.name for _, p in checkpoint.list_checkpoints(base / "metrics_full" /
                                                                                     "checkpoints")]}


def all_scenarios(rank: int, world_size: int, config_path: Path, base: Path) -> dict:
    """Every scenario in one world: starting CPU ranks costs more than the scenarios themselves."""
    return {"save_failures": save_failures(rank, world_size, config_path, base),
            "resume": resume_refuse_corrupt(rank, world_size, config_path, base),
            "check": check_pass_and_fail(rank, world_size, config_path, base),
            "other_meshes": check_other_meshes(rank, world_size, config_path, base),
            "nonfinite": nonfinite_losses(rank, config_path, base),
            "claims": run_directory_claims(rank, config_path, base),
            "manifest": damaged_manifest(rank, config_path, base),
            "metrics_full": metrics_disk_full(rank, config_path, base)}
