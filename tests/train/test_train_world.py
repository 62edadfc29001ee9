"""Training on 2 in-process CPU ranks (gloo): exact resume, refusing to overwrite, corrupt checkpoints, --check."""

import json

import pytest

from tests.distributed.harness import run_world

from . import workers
from .helpers import losses, write_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Run every scenario of tests/train/workers.py once in one 2-rank world; (base dir, per-rank results)."""
    base = tmp_path_factory.mktemp("train_world")
    config = write_config(base, check={"steps": 3})
    return base, run_world(2, workers.all_scenarios, config, base, timeout_s=170)


def test_resume_equals_uninterrupted(world):
    base, results = world
    straight = losses(base / "straight" / "metrics.jsonl")
    assert [step for step, _ in straight] == list(range(1, 7))
    assert straight[-1][1] < straight[0][1]
    # Bit-for-bit: same data position, optimizer state and weights after the resume, each step logged once.
    assert losses(base / "resumed" / "metrics.jsonl") == straight
    assert [r["resume"]["resumed_steps"] for r in results] == [[4, 5, 6]] * 2
    checkpoints = sorted(p.name for p in (base / "resumed" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000003", "step_00000006"]  # no .partial left behind


@pytest.mark.parametrize("failure, cause", [
    ("unwritable", "PermissionError: [Errno 13] Permission denied"),
    ("dcp_base_exception", "rank 1: OSError: [Errno 28] No space left on device"),
    ("one_rank_fails", "rank 1: OSError: [Errno 28] No space left on device"),
])
def test_failed_save_is_one_error_on_every_rank_and_keeps_the_last_checkpoint(world, failure, cause):
    base, results = world
    messages = {r["save_failures"]["errors"][failure] for r in results}
    assert len(messages) == 1, messages  # the same line on every rank
    message = messages.pop()
    assert message.startswith(f"checkpoint {base / 'save_failures' / 'checkpoints' / 'step_00000006'} not saved")
    assert cause in message and "\n" not in message
    assert results[0]["save_failures"]["left"][failure] == ["step_00000003"]


def test_resume_after_failed_saves_equals_uninterrupted(world):
    base, results = world
    assert [r["save_failures"]["resumed_steps"] for r in results] == [[4, 5, 6]] * 2
    assert losses(base / "save_failures" / "metrics.jsonl") == losses(base / "straight" / "metrics.jsonl")


def test_resume_of_a_complete_run_says_so_and_trains_nothing(world):
    base, results = world
    assert [r["resume"]["complete"]["records"] for r in results] == [[], []]
    printed = results[0]["resume"]["complete"]["printed"]
    assert f"nothing to train: the run is complete (step_00000006 in {base / 'resumed' / 'checkpoints'} is at " \
           f"step 6, train.steps = 6); raise --train.steps to train further" in printed
    assert "steps 7-6" not in printed and results[1]["resume"]["complete"]["printed"] == ""


def test_log_has_per_device_throughput_flops_and_mfu(world):
    base, _ = world
    record = json.loads((base / "straight" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["tokens_per_s_per_device"] == pytest.approx(record["tokens_per_s"] / 2)
    assert record["tflops_per_device"] > 0
    assert record["mfu"] is None  # a CPU has no peak in the table and log.peak_tflops is not set


def test_existing_checkpoints_are_never_overwritten(world):
    _, results = world
    for result in results:
        assert "already holds step_00000006: pass --resume" in result["resume"]["refused"]


def test_corrupt_checkpoint_fails_on_every_rank_with_one_message(world):
    _, results = world
    messages = {r["resume"]["corrupted"] for r in results}
    assert len(messages) == 1
    assert "does not match its CRC32 in the manifest (corrupt)" in messages.pop()


def test_check_mode_compares_context_parallel_with_full_attention(world):
    _, results = world
    pairs = results[0]["check"]["pairs"]
    assert len(pairs) == 3 and results[1]["check"]["pairs"] == pairs
    for parallel, full in pairs:
        assert abs(parallel - full) <= 1e-4 * abs(full)
    assert pairs[2][0] < pairs[0][0]  # the three steps trained something
    for result in results:  # a tolerance below float32 rounding must fail, on every rank
        assert result["check"]["failed"].startswith("--check failed: context-parallel losses differ")


def test_check_mode_on_data_parallel_with_accumulation_and_on_bf16(world):
    """dp=2 x grad_accum=2 exercises the loss normalisation across replicas and micro-steps; bf16 autocast
    exercises the dtype handling of the attention hook (RoPE promotes q and k to float32 under autocast)."""
    _, results = world
    for parallel, full in results[0]["other_meshes"]["data_parallel"]:
        assert abs(parallel - full) <= 1e-4 * abs(full)
    for parallel, full in results[0]["other_meshes"]["bf16"]:
        assert abs(parallel - full) <= 2e-2 * abs(full)
