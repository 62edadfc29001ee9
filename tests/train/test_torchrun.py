"""The trainer under torchrun (CPU ranks): a killed rank is restarted and resumes with nothing lost; a silent rank
fails the run within the timeout; bad input fails every rank with a clear message and a non-zero exit."""

import json
import time

import pytest

from .helpers import losses, torchrun, write_config

FAULT = "RING_FLASH_ATTN_TRAIN_FAULT"


def _tail(result) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """An 8-step run with checkpoints every 3 steps, nothing injected: the reference losses. Steps 4 and 5 are
    profiled (--profile), which must change nothing."""
    base = tmp_path_factory.mktemp("uninterrupted")
    config = write_config(base, train={"steps": 8})
    result = torchrun(2, ["--config", config, "--log.dir", base / "run", "--profile", "2"])
    assert result.returncode == 0, _tail(result)
    return config, base / "run", result


def test_profile_writes_a_trace_per_rank_and_prints_the_top_ops(uninterrupted):
    _, run, result = uninterrupted
    for rank in (0, 1):
        trace = json.loads((run / "profile" / f"rank{rank:05d}.json").read_text())
        steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
        assert steps == {"ProfilerStep#3", "ProfilerStep#4"}, steps  # 0-based: the run's 4th and 5th steps
    assert "top ops by self host time:" in result.stdout and "aten::mm" in result.stdout


def test_killed_rank_restarts_and_resumes_with_nothing_lost(uninterrupted, tmp_path):
    config, reference, _ = uninterrupted
    result = torchrun(2, ["--config", config, "--log.dir", tmp_path / "run", "--resume"], max_restarts=1,
                      env={FAULT: "kill@5:1"})  # rank 1 SIGKILLs itself at step 5 of the first attempt
    assert result.returncode == 0, _tail(result)
    assert "injecting 'kill' at step 5" in result.stdout
    assert "resumed from" in result.stdout and "step_00000003 (step 3)" in result.stdout
    assert losses(tmp_path / "run" / "metrics.jsonl") == losses(reference / "metrics.jsonl")


def test_sigterm_on_one_rank_stops_every_rank_with_a_checkpoint_and_resume_finishes(uninterrupted, tmp_path):
    config, reference, _ = uninterrupted
    args = ["--config", config, "--log.dir", tmp_path / "run", "--checkpoint.every", "0"]
    stopped = torchrun(2, args, env={FAULT: "term@4:1"})  # as a scheduler preempting the job would
    assert stopped.returncode != 0, _tail(stopped)
    for rank in (0, 1):
        assert f"[rank {rank}] stopped by SIGTERM after step 4 of 8; checkpoint step_00000004 saved" \
               in stopped.stderr, _tail(stopped)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000004"]
    resumed = torchrun(2, [*args, "--resume"])
    assert resumed.returncode == 0, _tail(resumed)
    assert losses(tmp_path / "run" / "metrics.jsonl") == losses(reference / "metrics.jsonl")


def test_silent_rank_fails_the_run_within_the_timeout_naming_the_step(tmp_path):
    config = write_config(tmp_path)
    started = time.monotonic()
    result = torchrun(2, ["--config", config, "--log.dir", tmp_path / "run", "--parallel.timeout_s", "4"],
                      env={FAULT: "hang@3:1"})
    assert result.returncode != 0, _tail(result)
    assert time.monotonic() - started < 90, "the run outlived the timeout by far"
    assert "[rank 0] error: step 3 failed on rank 0: " in result.stderr, _tail(result)
    assert "(this rank's context-parallel ring: ranks [0, 1]; a peer that stops answering fails the run after " \
           "parallel.timeout_s = 4 s)" in result.stderr, _tail(result)


def test_corrupt_checkpoint_exits_non_zero_on_every_rank(uninterrupted, tmp_path):
    config, reference, _ = uninterrupted
    latest = reference / "checkpoints" / "step_00000008"
    shard = next(latest.glob("*.distcp"))
    original = shard.read_bytes()
    try:
        shard.write_bytes(original[: len(original) // 2])  # a truncated file
        result = torchrun(2, ["--config", config, "--log.dir", reference, "--resume", "--train.steps", "9"])
    finally:
        shard.write_bytes(original)
    assert result.returncode != 0, _tail(result)
    for rank in (0, 1):
        assert f"[rank {rank}] error: checkpoint {latest}: file {shard.name} has {len(original) // 2} bytes, " \
               f"the manifest says {len(original)}" in result.stderr, _tail(result)


# Bad config values are unit-tested in test_config.py; these two show the same error reaching every rank of a
# real launch: one needs the world size, the other reads the file system on each rank.
@pytest.mark.parametrize("args, message", [
    (["--cp", "3"], "parallel.cp: the world size 2 must be a multiple of the context-parallel degree, got cp=3"),
    (["--data.source", "files", "--data.path", "/nonexistent/corpus.txt"],
     "data.path: no such file, directory or glob match: '/nonexistent/corpus.txt'"),
])
def test_bad_input_exits_non_zero_on_every_rank(tmp_path, args, message):
    config = write_config(tmp_path)
    result = torchrun(2, ["--config", config, "--log.dir", tmp_path / "run", *args], timeout_s=90)
    assert result.returncode != 0, _tail(result)
    for rank in (0, 1):
        assert f"[rank {rank}] error: " in result.stderr and message in result.stderr, _tail(result)
    assert result.stderr.count(message) == 2, _tail(result)
