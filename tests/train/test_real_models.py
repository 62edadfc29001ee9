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
from tests.tolerances import FORWARD, GRADIENT, rel_err

from . import real_model_workers
from .fsdp_workers import STEPS
from .helpers import plain_loss_and_modules, save_tiny_llama, save_tiny_tokenizer, write_config

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
    documents = [("data.document_mask", "true"), ("data.source", "files"), ("data.format", "jsonl"),
                 ("data.path", str(_short_documents(base / "documents.jsonl"))), ("data.seq_len", "64"),
                 ("train.micro_batch_size", "2")]
    results = run_world(2, real_model_workers.all_scenarios, config, base, pretrained, tokenized, documents,
                        timeout_s=180)
    return base, tiny, config, pretrained, results[0], results, documents


def _short_documents(path):
    """Documents of 3 to 40 bytes: a 64-token sequence holds several, and they cross the ranks' pieces."""
    generator = torch.Generator().manual_seed(3)
    lengths = torch.randint(3, 41, (400,), generator=generator).tolist()
    path.write_text("".join(json.dumps({"text": "".join(chr(97 + (i + j) % 26) for j in range(n))}) + "\n"
                            for i, n in enumerate(lengths)))
    return path


def test_pretrained_weights_reach_the_sharded_model_unchanged(world):
    _, tiny, _, _, results, _, _ = world
    saved = load_file(str(tiny / "model.safetensors"))
    loaded = results["pretrained_weights"]
    assert loaded.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(torch.from_numpy(loaded[name]), tensor), name


def test_pretrained_with_extended_rope_trains_as_one_process(world):
    _, _, config_path, pretrained, results, _, _ = world
    config = load_config(str(config_path), pretrained)
    dataset = PackedDataset.from_config(config.data)
    plan = BatchPlan(1, config.train.micro_batch_size, config.train.grad_accum)
    with plain_loss_and_modules():  # the gradients are read at each step, inside
        for step, (loss, model) in enumerate(trainer.reference_steps(config, dataset, plan, STEPS,
                                                                     torch.device("cpu"))):
            assert results["pretrained"]["losses"][step] == pytest.approx(loss, rel=LOSS_RTOL), step
            tolerance = GRADIENT[torch.float32] if step == 0 else LATER_GRADIENT_RTOL
            for name, p in model.named_parameters():
                error = rel_err(torch.from_numpy(results["pretrained"]["gradients"][step][name]), p.grad)
                assert error <= tolerance, (step, name, error)
    assert model.config.max_position_embeddings == 128 and model.config.rope_parameters["rope_type"] == "llama3"


def test_tokenized_once_by_rank0_and_reused(world):
    base, _, _, _, results, _, _ = world
    first, again = results["tokenized"]["runs"]
    assert "tokenizing the corpus into" in first["printed"] and "tokenizing" not in again["printed"]
    assert again["losses"] == first["losses"] and len(first["losses"]) == 3
    assert len(list((base / "token_cache").glob("*.tokens"))) == 1
    assert not list((base / "token_cache").glob("*.tmp*"))


def test_corrupt_token_cache_fails_every_rank_alike(world):
    _, _, _, _, _, every_rank, _ = world
    messages = {r["tokenized"]["corrupt"] for r in every_rank}
    assert len(messages) == 1
    message = messages.pop()
    assert "does not match its CRC32" in message and "(corrupt); delete both files to rebuild it" in message


def test_document_mask_equals_full_attention_per_document(world):
    """The oracle runs each document alone through the unsharded model: no packing, no mask, no ring."""
    _, _, config_path, _, results, _, documents = world
    config = load_config(str(config_path), documents)
    dataset = PackedDataset.from_config(config.data)
    plan = BatchPlan(1, config.train.micro_batch_size, config.train.grad_accum)
    model = trainer.full_model(config, "sdpa")
    batch = dataset.batch(plan.global_indices(0, 0), document_mask=True)
    targets, loss_sum, documents_seen = batch.num_targets, 0.0, 0
    for row in range(batch.input_ids.shape[0]):
        starts = torch.nonzero(batch.position_ids[row] == 0).flatten().tolist() + [batch.input_ids.shape[1]]
        for start, end in zip(starts, starts[1:]):
            logits = model(input_ids=batch.input_ids[row:row + 1, start:end]).logits
            loss = torch.nn.functional.cross_entropy(logits[0].float(), batch.labels[row, start:end],
                                                     reduction="sum")
            (loss / targets).backward()
            loss_sum += loss.item()
            documents_seen += 1
    assert documents_seen >= 6  # several documents per sequence, some crossing the two ranks' pieces
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)  # as the trainer's step does
    sharded = results["documents"]
    assert sharded["losses"][0] == pytest.approx(loss_sum / targets, rel=LOSS_RTOL)
    for name, p in model.named_parameters():
        error = rel_err(torch.from_numpy(sharded["gradients"][0][name]), p.grad)
        assert error <= GRADIENT[torch.float32], (name, error)
    # Later steps against the unsharded model on the packed rows (transformers masks by the restarting positions).
    with plain_loss_and_modules():
        reference = [loss for loss, _ in trainer.reference_steps(config, dataset, plan, STEPS, torch.device("cpu"))]
    assert sharded["losses"] == pytest.approx(reference, rel=LOSS_RTOL)


def test_export_loads_with_from_pretrained_and_gives_the_trained_logits(world, tmp_path):
    base, _, _, _, results, _, _ = world
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ring_flash_attn.cli import main

    out = tmp_path / "hf_model"
    assert main(["export", "--checkpoint", str(base / "export_run" / "checkpoints"), "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.eos_token == "<eos>" and len(tokenizer) <= model.config.vocab_size
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(results["export"]["input_ids"])).logits
    assert rel_err(logits, torch.from_numpy(results["export"]["logits"])) <= FORWARD[torch.float32]
    # Nothing is overwritten.
    assert main(["export", "--checkpoint", str(base / "export_run" / "checkpoints"), "--out", str(out)]) == 2
