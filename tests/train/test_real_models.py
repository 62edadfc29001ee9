"""Real models on 2 CPU ranks (gloo): a pretrained transformers directory saved by the test is loaded into the
sharded model (each rank its shards, from rank 0) and trains as one process would, with a Llama 3 rope
extension to twice its positions."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ring_flash_attn.train.config import load_config
from ring_flash_attn.train.data import BatchPlan, PackedDataset
from ring_flash_attn.train import trainer
from tests.distributed.harness import run_world
from tests.tolerances import GRADIENT, rel_err

from . import real_model_workers
from .fsdp_workers import STEPS
from .helpers import save_tiny_llama, save_tiny_tokenizer, write_config

LOSS_RTOL = 1e-5
LATER_GRADIENT_RTOL = 1e-3
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("real_models")
    tiny = save_tiny_llama(base / "tiny_llama")
    config = write_config(base, data={"seq_len": 128, "max_bytes": 200_000})
    pretrained = [("model.pretrained", str(tiny)), ("model.rope_scaling", json.dumps(LLAMA3_ROPE))]
    tokenizer = save_tiny_tokenizer(base / "tokenizer")
    tokenized = [("data.tokenizer", str(tokenizer)), ("data.cache_dir", str(base / "token_cache")),
                 ("data.max_bytes", "60000"), ("train.steps", "3"), ("checkpoint.every", "0")]
    results = run_world(2, real_model_workers.all_scenarios, config, base, pretrained, tokenized,
                        timeout_s=180)
    return base, tiny, config, pretrained, results[0], results


def test_pretrained_weights_reach_the_sharded_model_unchanged(world):
    _, tiny, _, _, results, _ = world
    saved = load_file(str(tiny / "model.safetensors"))
    loaded = results["pretrained_weights"]
    assert loaded.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(torch.from_numpy(loaded[name]), tensor), name


def test_pretrained_with_extended_rope_trains_as_one_process(world):
    _, _, config_path, pretrained, results, _ = world
    config = load_config(str(config_path), pretrained)
    dataset = PackedDataset.from_config(config.data)
    plan = BatchPlan(1, config.train.micro_batch_size, config.train.grad_accum)
    reference = trainer.reference_steps(config, dataset, plan, STEPS, torch.device("cpu"))
    for step, (loss, model) in enumerate(reference):
        assert results["pretrained"]["losses"][step] == pytest.approx(loss, rel=LOSS_RTOL), step
        tolerance = GRADIENT[torch.float32] if step == 0 else LATER_GRADIENT_RTOL
        for name, p in model.named_parameters():
            error = rel_err(torch.from_numpy(results["pretrained"]["gradients"][step][name]), p.grad)
            assert error <= tolerance, (step, name, error)
    assert model.config.max_position_embeddings == 128 and model.config.rope_parameters["rope_type"] == "llama3"


def test_tokenized_once_by_rank0_and_reused(world):
    base, _, _, _, results, _ = world
    first, again = results["tokenized"]["runs"]
    assert "tokenizing the corpus into" in first["printed"] and "tokenizing" not in again["printed"]
    assert again["losses"] == first["losses"] and len(first["losses"]) == 3
    assert len(list((base / "token_cache").glob("*.tokens"))) == 1
    assert not list((base / "token_cache").glob("*.tmp*"))


def test_corrupt_token_cache_fails_every_rank_alike(world):
    *_, every_rank = world
    messages = {r["tokenized"]["corrupt"] for r in every_rank}
    assert len(messages) == 1
    message = messages.pop()
    assert "does not match its CRC32" in message and "(corrupt); delete both files to rebuild it" in message
