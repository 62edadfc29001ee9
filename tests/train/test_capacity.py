"""``ring-attn capacity`` on CPU ranks: doubling then bisection down to the longest length that trains (an
out-of-memory error injected from a given length on), a failure on one rank ending every rank's trial at once,
the plan's prediction; and the memory-lean step's own goal on 2 CPU ranks: a 128,256-token vocabulary at 4,096
tokens per rank in under 1.25 GiB per process, the loss that of the plain logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from ring_flash_attn.train import capacity
from ring_flash_attn.train.config import load_config
from ring_flash_attn.train.data import PackedDataset
from ring_flash_attn.train.faults import ENV_VAR

from .helpers import REPO_ROOT, torchrun, write_config


def _capacity(args, env=None, timeout_s=240):
    return subprocess.run([sys.executable, "-m", "ring_flash_attn", "capacity", *map(str, args)], cwd=REPO_ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), **(env or {})),
                          capture_output=True, text=True, timeout=timeout_s)


def test_doubles_then_bisects_to_the_longest_length_that_trains(tmp_path):
    config = write_config(tmp_path)
    out = tmp_path / "capacity.json"
    result = _capacity(["--config", config, "--parallel.cp", "1", "--min-seq-len", 128, "--max-seq-len", 4096,
                        "--resolution", 64, "--steps", 1, "--work-dir", tmp_path / "trials", "--out", out],
                       env={ENV_VAR: "oom@1:0:256"})
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(out.read_text())
    assert [(t["seq_len"], t["ok"]) for t in found["trials"]] == [(128, True), (256, False), (192, True)]
    assert found["longest"] == 192 and found["trials"][1]["out_of_memory"]
    assert found["trials"][0]["peak_bytes"] > 0 and found["trials"][0]["tokens_per_s_per_device"] > 0
    assert found["trials"][1]["plan_dominant"]  # the plan the trial printed, read back
    assert "longest data.seq_len that completed a step: 192 tokens" in result.stdout
    assert "first failure: 256 tokens ran out of memory in faults.py; the memory plan's largest part there:" \
        in result.stdout


def test_a_rank_out_of_memory_ends_every_ranks_trial_at_once(tmp_path):
    """Rank 1's trial fails at its first step; rank 0's waits in the ring for a peer that is gone, and is ended
    within a second or so, long before the trial's own collective timeout (60 s)."""
    config = write_config(tmp_path)
    started = time.monotonic()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ring_flash_attn", "capacity", "--config", str(config), "--min-seq-len", "64",
               "--max-seq-len", "64", "--steps", "1", "--work-dir", str(tmp_path / "trials")]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT),
                                     **{ENV_VAR: "oom@1:1"}))
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert elapsed < 45, elapsed
    assert "no length completed a step" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    assert "out of memory" in result.stdout


def test_predict_prints_the_plan_and_the_longest_length(tmp_path):
    config = load_config(str(write_config(tmp_path)), [("parallel.device", "cuda")])
    lines = capacity.predict(config, 8, 80.0)
    assert lines[0].startswith("model: ") and "8 rank(s), cp = 2; 80 GiB per rank (given, cuda)" in lines[0]
    assert any(line.startswith("memory plan per rank at 32 tokens") for line in lines)
    assert lines[-1].startswith("predicted longest data.seq_len: ")
    assert int(lines[-1].split(": ")[1].split()[0].replace(",", "")) % 4 == 0


def test_large_vocabulary_at_4096_tokens_per_rank_stays_under_1_25_gib_per_process(tmp_path):
    """2 CPU ranks, a 2-layer model (hidden 64) with a 128,256-token vocabulary, 4,096 tokens per rank: before
    the chunked loss a process peaked at 6.56 GiB. The loss is the plain cross-entropy of the model's logits."""
    model = {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "extra": {"vocab_size": 128256}}
    config = write_config(tmp_path, model=model, data={"seq_len": 8192, "max_bytes": 100_000},
                          train={"steps": 1, "loss_chunk_mib": None, "tile_mib": 1024},  # the defaults
                          checkpoint={"save": False})
    result = torchrun(2, ["--config", config, "--log.dir", tmp_path / "run"], timeout_s=240)
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = [json.loads((tmp_path / "run" / f"rank{r:05d}.json").read_text())["peak_memory_bytes"] for r in (0, 1)]
    assert max(peaks) < 1.25 * 2 ** 30, peaks
    loss = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    run = load_config(str(config))
    from ring_flash_attn.train import trainer

    reference = trainer.build_model(run, "sdpa")  # rank 0's initial weights: the same seed
    sample = PackedDataset.from_config(run.data).sample(0)
    with torch.no_grad():
        hidden = reference.model(input_ids=sample[:-1].unsqueeze(0)).last_hidden_state[0]
        total = sum(torch.nn.functional.cross_entropy(reference.lm_head(piece), target, reduction="sum")
                    for piece, target in zip(hidden.split(1024), sample[1:].split(1024)))
    assert loss == pytest.approx(total.item() / 8192, rel=1e-5)
