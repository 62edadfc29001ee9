"""Training on 2 in-process CPU ranks (gloo): exact resume, refusing to overwrite, corrupt checkpoints, --check."""

import json
import os

import pytest

from ring_flash_attn.train import rundir, trainer
from tests.distributed.harness import run_world

from . import workers
from .helpers import losses, write_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Run every scenario of tests/train/workers.py once in one 2-rank world; (base dir, per-rank results)."""
    base = tmp_path_factory.mktemp("train_world")
    config = write_config(base, check={"steps": 3})
    held = rundir.lock_log_dir(base / "locked")  # another run (this process) holds that log.dir meanwhile
    try:
        return base, run_world(2, workers.all_scenarios, config, base, timeout_s=170)
    finally:
        held.release()


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


def test_nonfinite_loss_stops_every_rank_before_the_optimizer_step_and_keeps_checkpoints(world):
    """train.nonfinite error (the default): a NaN loss at step 5 stops every rank with one message; the good
    step-3 checkpoint stays (checkpoint.keep 1 used to delete it for a NaN step_6), and nothing is logged
    after step 4."""
    _, results = world
    messages = {r["nonfinite"]["error_run"]["error"] for r in results}
    assert len(messages) == 1, messages
    message = messages.pop()
    assert message.startswith("step 5: the loss is nan and the gradient norm nan (not finite): stopped before the "
                              "optimizer step, so the weights and checkpoints are as after step 4"), message
    assert "set train.nonfinite: skip" in message
    assert results[0]["nonfinite"]["error_run"]["left"] == ["step_00000003"]
    assert results[0]["nonfinite"]["error_run"]["logged"] == [1, 2, 3, 4]


def test_skipped_nonfinite_step_changes_no_weight_and_no_optimizer_state(world):
    _, results = world
    for result in results:
        steps = result["nonfinite"]["skip_steps"]
        assert steps["first"].skipped is None and steps["after"].skipped is None
        assert steps["poisoned"].skipped == trainer.SKIPPED_NONFINITE
        assert steps["after"].loss == steps["after"].loss  # finite again: the skipped step left no NaN behind
    assert results[0]["nonfinite"]["skip_steps"]["unchanged"] is True


def test_a_model_holding_nan_is_never_saved(world):
    base, results = world
    messages = {r["nonfinite"]["skip_steps"]["refused"] for r in results}
    assert len(messages) == 1, messages
    message = messages.pop()
    assert message.startswith(f"checkpoint {base / 'nan_skip' / 'checkpoints' / 'step_00000004'} not saved: rank 1: "
                              f"parameter ") and "holds NaN or infinite values" in message, message
    assert results[0]["nonfinite"]["skip_steps"]["left"] == ["step_00000003"]  # keep 1 deleted nothing


def test_skipped_step_is_logged_and_counted(world):
    _, results = world
    run = results[0]["nonfinite"]["skip_run"]
    assert [r["step"] for r in run["records"]] == [1, 2, 3]
    assert [r.get("skipped") for r in run["logged"]] == [None, trainer.SKIPPED_NONFINITE, None]
    assert run["logged"][1]["loss"] is None and run["logged"][1]["skipped_steps"] == 1
    assert "step 2: skipped (non-finite loss or gradient norm; loss nan)" in run["printed"]
    assert "steps 1-3 in" in run["printed"] and "(1 skipped: see 'skipped' in the log)" in run["printed"]


def test_a_log_dir_in_use_fails_every_rank_naming_the_holder(world):
    base, results = world
    for result in results:
        message = result["claims"]["locked"]
        assert f"log.dir '{base / 'locked'}' is in use by another run (host " in message, message
        assert f", pid {os.getpid()}, started " in message and "give this run another log.dir" in message
    assert results[0]["claims"]["locked_dir_after"] == [".lock"]  # the second run wrote nothing there


def test_a_log_dir_that_cannot_be_created_fails_every_rank(world):
    base, results = world
    for result in results:
        assert f"log.dir '{base / 'a_file' / 'run'}': cannot create it (" in result["claims"]["unwritable"]


def test_a_manifest_of_the_wrong_shape_is_one_error_on_every_rank(world):
    base, results = world
    messages = {r["manifest"]["error"] for r in results}
    assert len(messages) == 1, messages
    assert f"checkpoint {base / 'bad_manifest' / 'checkpoints' / 'step_00000006'}: manifest.json is not a manifest " \
           f"of ring-attn train" in messages.pop()


def test_a_peer_lost_during_a_save_is_a_checkpoint_error_naming_the_save(world):
    """A rank that dies mid-save left the others with gloo's bare "Connection reset by peer"."""
    base, results = world
    for rank, result in enumerate(results):
        message = result["nonfinite"]["skip_steps"]["peer_lost"]
        assert message.startswith(f"checkpoint {base / 'nan_skip' / 'checkpoints' / 'step_00000005'} not saved: rank "
                                  f"{rank} lost a peer during the save ("), message
        assert message.endswith("the checkpoints already saved are intact: continue from the last with --resume")


def test_skipping_stops_when_the_model_does_not_recover(world):
    """train.nonfinite skip over NaN after NaN would train nothing and report success: MAX_NONFINITE_IN_A_ROW (10;
    3 in this test) in a row stop the run."""
    _, results = world
    for result in results:
        assert result["nonfinite"]["never_recovers"].startswith(
            "steps 2-4: 3 steps in a row had a non-finite loss or gradient norm and were skipped"), result


def test_a_metrics_log_that_cannot_be_written_stops_every_rank_with_a_checkpoint(world):
    base, results = world
    messages = {r["metrics_full"]["error"] for r in results}
    assert len(messages) == 1, messages
    assert messages.pop() == (f"log.dir: cannot write {base / 'metrics_full' / 'metrics.jsonl'} (OSError: No space "
                              f"left on device) after step 4; every rank stopped there and saved checkpoint "
                              f"step_00000004 in {base / 'metrics_full' / 'checkpoints'}: free space (or repair the "
                              f"file) and continue with --resume")
    assert results[0]["metrics_full"]["left"] == ["step_00000003", "step_00000004"]
